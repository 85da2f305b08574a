"""The trainer's diffusers / transformers floors (trainer/families/libraries.py): every family's
classes import with the installed releases, a too-old or incomplete install is refused at start
with the version to install, and the requirement files state the same floors."""
import re
import types
from pathlib import Path

import pytest

from trainer.families import FAMILIES
from trainer.families.libraries import FAMILY_CLASSES, FLOORS, LibraryVersionError, check_libraries

REPO = Path(__file__).resolve().parents[1]


def test_every_family_imports_its_classes():
    assert set(FAMILIES) <= set(FAMILY_CLASSES), "list the new family's classes in trainer/families/libraries.py"
    check_libraries()  # the real install: every class of every family (and the 2509/2511 one) imports


@pytest.mark.parametrize("lib,old", [("diffusers", "0.36.0"), ("transformers", "4.55.4")])
def test_too_old_release_names_the_version_to_install(monkeypatch, lib, old):
    import importlib

    monkeypatch.setattr(importlib.import_module(lib), "__version__", old)
    with pytest.raises(LibraryVersionError) as e:
        check_libraries("qwen_image_edit")
    msg = str(e.value)
    assert f"{lib} {old} is installed, the trainer needs {lib}>={FLOORS[lib]}" in msg, msg
    assert f"pip install -U 'diffusers>={FLOORS['diffusers']}' 'transformers>={FLOORS['transformers']}'" in msg, msg


def test_missing_class_is_named():
    import transformers

    # a release new enough by number but without the Qwen classes (a trimmed or broken install)
    fake = types.SimpleNamespace(__version__=FLOORS["diffusers"], FluxTransformer2DModel=object,
                                 AutoencoderKL=object, FlowMatchEulerDiscreteScheduler=object)
    with pytest.raises(LibraryVersionError) as e:
        check_libraries(["flux_kontext", "qwen_image_edit"], modules={"diffusers": fake, "transformers": transformers})
    msg = str(e.value)
    assert "diffusers.QwenImageTransformer2DModel (base family qwen_image_edit" in msg, msg
    assert "diffusers.FluxKontextPipeline (base family flux_kontext)" in msg, msg
    assert "FluxTransformer2DModel (" not in msg, msg
    check_libraries("flux_kontext", modules={"diffusers": types.SimpleNamespace(
        **vars(fake), FluxKontextPipeline=object), "transformers": transformers})


def test_trainer_refuses_at_start(monkeypatch, tmp_path, capsys):
    import diffusers

    from trainer.train import main

    monkeypatch.setattr(diffusers, "__version__", "0.35.2")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base:\n  family: sd15_ip2p\n  path: {tmp_path / 'base'}\n  tiny: true\n")
    assert main(["--config", str(cfg), "--output", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "diffusers 0.35.2 is installed" in err and f"'diffusers>={FLOORS['diffusers']}'" in err, err
    assert not (tmp_path / "base").exists() and not (tmp_path / "out").exists()  # refused before any work


def test_requirement_files_state_the_floors():
    import tomllib

    train = (REPO / "requirements-train.txt").read_text()
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    for lib, floor in FLOORS.items():
        assert re.search(rf"^{lib}>={re.escape(floor)}$", train, re.M), f"requirements-train.txt: {lib}>={floor}"
        assert f"{lib}>={floor}" in extra, f"pyproject [project.optional-dependencies] train: {lib}>={floor}"
