"""A reduced `make demo` run (scripts/demo.py --quick): every stage runs with tiny step counts,
including the headless ComfyUI workflow; checks the outputs, metrics.json and the cache."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, micro_base):
    import demo

    root = tmp_path_factory.mktemp("demo")
    args = ["--quick", "--no-progress", "--models", str(root / "models"), "--out", str(root / "out"),
            "--micro", str(micro_base.diffusers_dir), "--comfy-images", "1"]
    first = demo.main(args)
    second = demo.main(args + ["--no-comfy"])  # everything cached now
    return root, first, second


def test_outputs_and_metrics(quick_demo, capsys):
    import demo_core as D

    root, result, _ = quick_demo
    out = root / "out"
    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"].keys() == set(D.SPLITS)
    tasks = m["settings"]["tasks"]
    for split in D.SPLITS:
        for method in ("base", "shared_lora", "per_task_lora", "hywu", "vae_ceiling", "identity"):
            row = m["metrics"][split][method]
            assert set(row["per_task"]) == set(tasks)
            for v in list(row["per_task"].values()) + [row["overall"], row["conflicting"]]:
                assert _finite(v["psnr"]) and _finite(v["ssim"]) and -1 <= v["ssim"] <= 1
    for when in ("init", "trained"):
        g = m["gradient_cosine"][when]
        assert set(g["conflicting_pairs"]) == {"brighten|darken", "shift_left|shift_right", "red_to_blue|blue_to_red"}
        assert all(_finite(v) and -1.0001 <= v <= 1.0001 for v in g["all_pairs"].values())
        assert _finite(g["mean_conflicting"]) and _finite(g["mean_other_pairs"])
    for v in m["lora_task_separation_val"].values():
        assert 0 <= v["eta2"] <= 1 + 1e-9 and _finite(v["relative_spread"])
        assert set(m["gradient_cosine"]["trained"]["centred"]["conflicting_pairs"]) == set(g["conflicting_pairs"])
    assert _finite(m["timings_s"]["total"])
    grid = Image.open(out / "grid.png")
    assert grid.width > 5 * 32 and grid.height > 32
    assert (out / "grid_heldout_phrasing.png").is_file()
    pngs = list((out / "images").glob("val*_hywu.png"))
    assert len(pngs) == len(tasks)
    # the table is printed
    text = D.format_table(m["metrics"], D.DemoSettings(**{**m["settings"], "tasks": tuple(tasks)}))
    assert "HY-WU" in text and "shared LoRA" in text and "per-task LoRA" in text


def test_built_artefacts(quick_demo):
    from hywu_nodes.core import read_generator_info

    root, _, _ = quick_demo
    models = root / "models"
    info = read_generator_info(models / "hywu" / "hywu_demo.safetensors")
    assert info.base_family == "sd15_ip2p" and info.config.rank == 8
    assert (models / "checkpoints" / "hywu_demo_sd15_ip2p.safetensors").is_file()
    assert (models / "demo" / "base" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_comfyui_ran_the_demo_workflow(quick_demo):
    root, result, _ = quick_demo
    c = result["comfyui"]
    assert c.get("ran"), c.get("error")
    assert len(c["edits"]) == 2 and {e["task"] for e in c["edits"]} == {"shift_left", "shift_right"}
    for e in c["edits"]:
        img = np.asarray(Image.open(root / "out" / e["file"]))
        assert img.shape == (32, 32, 3) and _finite(e["psnr"])
        # ComfyUI and the in-process pipeline make the same edit (same seed; fp16 checkpoint)
        assert e["psnr_vs_inprocess"] > 30, e


def test_second_run_reuses_the_cache(quick_demo):
    _, first, second = quick_demo
    trained = [k for k in first["timings_s"] if k.startswith(("pretrain", "train "))]
    assert len(trained) == 4
    assert not [k for k in second["timings_s"] if k.startswith(("pretrain", "train ", "export"))]
    # same models, same seeds: same numbers
    a, b = first["metrics"]["val"]["hywu"]["overall"], second["metrics"]["val"]["hywu"]["overall"]
    assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-6)
