"""The pack passes the Comfy Registry's own validation (`comfy node validate`: pyproject
metadata and the security checks: no eval/exec, no package installs at run time), and its
metadata meets the Registry specification (docs.comfy.org/registry/specifications)."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_comfy_node_validate_passes():
    comfy = Path(sys.executable).with_name("comfy")
    out = subprocess.run([str(comfy), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    # comfy-cli exits 0 on security warnings (eval/exec, ...) and only prints them.
    assert out.returncode == 0 and "All validation checks passed" in text, text
    assert "warning" not in text.lower(), text


def test_pyproject_registry_metadata_and_requirements_agree():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["tool"]["comfy"]["PublisherId"] and meta["project"]["name"] == "hy-wu"
    reqs = [l.split("#")[0].strip() for l in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r]
    assert reqs == meta["project"]["dependencies"]
    # Installing the pack into a user's ComfyUI must never reinstall torch.
    assert not any(r.split("=")[0].split(">")[0].split("<")[0].strip().lower() in ("torch", "torchvision", "torchaudio") for r in reqs)


SPEC = "https://docs.comfy.org/registry/specifications"


def test_pyproject_meets_the_registry_specification():
    """The spec's required fields and formats, read with comfy-cli's own parser too (it drops a
    malformed requires-comfyui or classifier with only a warning)."""
    from comfy_cli.registry.config_parser import extract_node_configuration
    from PIL import Image

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    # [project].name (required): the node id
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), (name, SPEC)
    assert "comfyui" not in name.lower(), f"the node id must not include ComfyUI ({SPEC})"
    # version (required): X.Y.Z
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    # license: {file = ...} (that file exists) or {text = ...}
    lic = project["license"]
    assert isinstance(lic, dict) and ("text" in lic or (REPO / lic["file"]).is_file()), lic
    assert project["description"] and project["requires-python"].startswith(">=")
    repo_url = project["urls"]["Repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", repo_url).group(1)
    # classifiers: OS and accelerator, from the spec's lists
    cls = project["classifiers"]
    assert any(c.startswith("Operating System :: ") for c in cls) and any(c.startswith("Environment :: ") for c in cls)
    # [tool.comfy]: PublisherId (required), Icon: a raw URL of an image shipped here, at most 800x400
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"]), comfy["PublisherId"]
    icon = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(owner_repo)}/main/(.+)", comfy["Icon"])
    assert icon, f"Icon must be the raw URL of a file in {owner_repo}: {comfy['Icon']}"
    path = REPO / icon.group(1)
    assert path.is_file(), f"{path} is not in the repo (python scripts/hywu_make_icon.py)"
    with Image.open(path) as im:
        assert im.format in ("PNG", "JPEG", "GIF") and im.width <= 800 and im.height <= 400, (im.format, im.size)
    assert path.stat().st_size < 20_000, "keep the icon small"
    # requires-comfyui: the lowest ComfyUI the tests run on (scripts/setup_comfyui.sh sets it up)
    assert comfy["requires-comfyui"] == ">=0.3.75"
    assert "ComfyUI 0.3.75" in (REPO / "scripts" / "setup_comfyui.sh").read_text()

    parsed = extract_node_configuration(str(REPO / "pyproject.toml"))
    assert parsed.project.name == name and parsed.project.version == project["version"]
    assert parsed.project.supported_comfyui_version == ">=0.3.75"
    assert parsed.project.supported_os == ["OS Independent"]
    assert parsed.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert parsed.tool_comfy.icon == comfy["Icon"] and parsed.project.urls.repository == repo_url


def test_version_changes_with_the_generator_format():
    """MAJOR of the pack version is the generator format version: a format change bumps it."""
    from hywu_nodes.core.metadata_schema import FORMAT_VERSION

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert int(version.split(".")[0]) == FORMAT_VERSION, (
        f"generator format v{FORMAT_VERSION} but pack version {version}: set [project].version to "
        f"{FORMAT_VERSION}.0.0 in pyproject.toml")
