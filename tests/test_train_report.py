""""Did it work": a real `python -m trainer.train` run on a manifest holds rows out, reports the
validation loss with and without the LoRA, writes labelled grids of held-out rows, a loss curve
and a closing summary that says where the generator is and how to copy it into ComfyUI; files
are 0644; the test base is named as such."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from trainer.data import val_split
from trainer.report import loss_curve, summary_lines, random_base_kind
from trainer.tiny_bases import tiny_config

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
COLOURS = [(25 * i, 250 - 25 * i, (90 * i) % 256) for i in range(10)]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_run_reports_validation_grid_curve_and_summary(tmp_path):
    for i, c in enumerate(COLOURS):  # one flat colour per row: a grid cell says which row it shows
        Image.new("RGB", (32, 32), c).save(tmp_path / f"s{i}.png")
        Image.new("RGB", (32, 32), tuple(255 - v for v in c)).save(tmp_path / f"t{i}.png")
    rows = [{"source": f"s{i}.png", "target": f"t{i}.png", "instruction": f"invert colour {i}"} for i in range(10)]
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    cfg = tiny_config("sd15_ip2p", out, data={"source": "manifest", "path": str(tmp_path / "edits.jsonl"),
                                              "val_fraction": 0.2, "n_val": 2},
                      train={"max_steps": 6, "batch_size": 2, "device": "cpu", "validate_every": 3, "save_every": 3,
                             "validate_steps": 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(tmp_path / "c.yaml")], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    o, e = r.stdout, r.stderr
    # up front: the data check, the test-base note, the base's validation loss, the estimate, TensorBoard
    assert "training data:" in o and "validation: 2 of the 10 usable rows held out" in o and "training on 8 rows" in o
    assert "is the seeded tiny test base" in o and "make demo" in o and o.count("seeded tiny test base") == 1
    assert "validation: the loss on 2 held-out rows" in o and "every 3 steps and at the end" in o
    assert "estimate: " in o and "s/step from the first 4 steps" in o
    assert "encoding rows (once" in e
    try:
        import tensorboard  # noqa: F401

        assert "TensorBoard logs:" in o
    except ImportError:
        assert "TensorBoard is not installed" in o
    # during: validation at validate_every; at the end: the summary
    assert "step 3: validation loss" in o and "step 6: validation loss" in o
    gen = (out / "tiny_sd15_ip2p.safetensors").resolve()
    assert f"generator: {gen}" in o and f"use it in ComfyUI: cp {gen} ComfyUI/models/hywu/" in o
    assert "validation loss (2 held-out rows):" in o and "for the base without it" in o
    s = json.loads((out / "summary.json").read_text())
    v = s["validation"]
    assert v["rows"] == 2 and [step for step, _ in v["history"]] == [3, 6] and v["base_loss"] > 0 and v["loss"] > 0
    assert s["data_check"]["train"]["usable"] == 10 and s["deterministic"] is True
    # the grid shows the held-out rows, labelled: header, 2 rows of 4 cells of 128 px, a caption under each
    held = val_split(10, 0.2)
    grid = Image.open(out / "samples" / "step-00000006.png").convert("RGB")
    assert grid.size == (4 * 128, 16 + 2 * (128 + 16))
    a = np.asarray(grid).astype(int)
    for k, i in enumerate(held):
        cell = a[16 + k * 144 + 10: 16 + k * 144 + 118, 10:118]  # inside the source cell
        assert np.abs(cell - np.array(COLOURS[i])).max() <= 1, f"grid row {k} is not held-out row {i}"
    curve = Image.open(out / "loss.png")
    assert curve.size == (720, 400)
    assert 0 < np.asarray(curve.convert("L")).std()
    for p in [gen, out / "summary.json", out / "loss.png", out / "samples" / "step-00000006.png",
              *[f for f in (out / "checkpoints").rglob("*") if f.is_file()]]:
        assert _mode(p) == 0o644, (p, oct(_mode(p)))


def test_summary_lines_and_curve_helpers(tmp_path):
    s = {"name": "n", "method": "hywu", "base_family": "sd15_ip2p", "steps": 10, "resumed_from": 4, "seconds": 130,
         "first_loss": 1.0, "final_loss": 0.5, "mean_loss_last_10": 0.6, "files": ["/x/n.safetensors"],
         "validation": {"rows": 8, "loss": 0.9, "base_loss": 1.0}, "skipped_total": 0}
    text = "\n".join(summary_lines(s))
    assert "10 steps (resumed at step 4) in 2.2 min" in text
    assert "0.9000 with the trained LoRA vs 1.0000 for the base without it (-10.0%: better than the base)" in text
    assert "cp /x/n.safetensors ComfyUI/models/hywu/" in text
    s["validation"] = {"rows": 0}
    assert "no held-out rows" in "\n".join(summary_lines(s))
    p = loss_curve(tmp_path / "c.png", [1.0, None, 0.8, float("nan"), 0.7], [(5, 0.75)], 0.9)  # skipped steps are gaps
    assert Image.open(p).size == (720, 400) and _mode(p) == 0o644
    for marker, kind in (("hywu_micro_base.json", "micro"), ("tiny_base.json", "tiny")):
        d = tmp_path / kind
        d.mkdir()
        (d / marker).write_text("{}")
        assert random_base_kind(str(d)) == kind
        (d / "hywu_demo_base.json").write_text("{}")  # the demo's trained base shows edits: no note
        assert random_base_kind(str(d)) is None
    assert random_base_kind(str(tmp_path)) is None


def test_condition_encode_warns_when_the_image_is_much_larger_than_training(micro_base):
    """The 280 s case of issue 19: a 512 px source for a 64 px generator."""
    import torch

    import comfy_harness
    from hywu_nodes.core.conditions import standard_condition_spec

    comfy_harness.import_comfy(micro_base.comfyui, extra_modules=("comfy.sd", "comfy_api.latest", "hywu_nodes.nodes.encode"))
    from hywu_nodes.nodes.encode import large_image_warning

    spec = standard_condition_spec(768, 77, 4, 64)
    msg = large_image_warning(spec, torch.zeros(1, 512, 384, 3), "mine")
    assert msg and "384x512" in msg and "trained at 64x64" in msg and "48x the pixels" in msg and "ImageScale" in msg
    assert large_image_warning(spec, torch.zeros(1, 96, 96, 3)) is None  # near the training size: quiet
