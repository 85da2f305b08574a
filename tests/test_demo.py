"""A reduced `make demo` run (scripts/hywu_demo.py --quick): every stage runs with tiny step counts,
the three methods are trained by `python -m trainer.train`, and the headless ComfyUI part runs
the demo workflow and a core LoraLoaderModelOnly graph. Checks outputs, metrics.json, the
installed files and the cache. (The full demo's figures are in docs/demo.md.)"""

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, micro_base):
    import hywu_demo as demo

    root = tmp_path_factory.mktemp("demo")
    args = ["--quick", "--no-progress", "--models", str(root / "models"), "--out", str(root / "out"),
            "--micro", str(micro_base.diffusers_dir), "--comfy-images", "1"]
    import diffusers.utils.logging
    import transformers.utils.logging

    # Their log handlers bind sys.stderr when first made: make them now, not inside the redirect.
    diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    buf = io.StringIO()  # not a terminal, as `make demo > log` or CI: no progress-bar frames expected
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        first = demo.main(args[:1] + args[2:])  # bars (and ETA lines) enabled: the demo chooses by isatty
    log = buf.getvalue()
    print(log)
    second = demo.main(args + ["--no-comfy"])  # everything cached now
    return root, first, second, log


def test_outputs_and_metrics(quick_demo):
    import hywu_demo_core as D
    from trainer import synthetic

    root, result, *_ = quick_demo
    out = root / "out"
    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"].keys() == set(D.SPLITS)
    tasks = m["tasks"]
    assert tasks == list(synthetic.ADAPTER_TASKS)
    for split in D.SPLITS:
        for method in ("base", "shared_lora", "per_task_lora", "hywu", "vae_ceiling", "identity"):
            row = m["metrics"][split][method]
            assert set(row["per_task"]) == set(tasks)
            for v in [*row["per_task"].values(), row["overall"], row["conflicting"], row["non_conflicting"]]:
                assert _finite(v["psnr"]) and _finite(v["ssim"]) and -1 <= v["ssim"] <= 1
            assert row["overall"]["n"] == 2 * len(tasks)
            acc = row["pair_accuracy"]  # the share of each pair's edits closer to their own target
            assert set(acc) == {f"{a}|{b}" for a, b in synthetic.CONFLICT_PAIRS} and all(0 <= v <= 1 for v in acc.values())
            assert row["pair_accuracy_min"] == min(acc.values())
    pairs = {f"{a}|{b}" for a, b in synthetic.CONFLICT_PAIRS}
    for when in ("init", "trained"):
        for kind in ("raw", "centred"):
            g = m["gradient_cosine"][when][kind]
            assert set(g["conflicting_pairs"]) == pairs
            assert all(_finite(v) and -1.0001 <= v <= 1.0001 for v in g["conflicting_pairs"].values())
    for v in m["lora_task_separation_val"].values():
        assert 0 <= v["eta2"] <= 1 + 1e-9 and _finite(v["relative_spread"])
    assert m["lora_task_separation_val"]["per_task_lora"]["eta2"] > 0.99  # one LoRA per task: all variance between tasks
    e = m["base_editor"]
    assert e["tasks"] == list(synthetic.BASE_TASKS) and e["n"] == 2 * len(e["tasks"])
    assert all(_finite(e[k]["overall"]) and -1 <= e[k]["ssim"] <= 1 for k in ("base", "identity", "vae_ceiling"))
    c = m["text_clustering"]
    assert 0 <= c["heldout_accuracy"] <= 1 and c["n_heldout"] > 0 and set(c["pair_cosine"]) == pairs
    for method in ("shared_lora", "per_task_lora", "hywu"):
        assert m["trainer_runs"][method]["steps"] == 2  # trained by python -m trainer.train (QUICK_TRAIN)
    assert _finite(m["timings_s"]["total"])
    grid = Image.open(out / "grid.png")
    assert grid.width > 5 * 32 and grid.height > 32
    assert (out / "grid_heldout_phrasing.png").is_file()
    assert len(list((out / "images").glob("val*_hywu.png"))) == 2 * len(tasks)


def test_installed_files_load_where_users_load_them(quick_demo):
    from hywu_nodes.core import read_generator_info
    from trainer import synthetic

    root, *_ = quick_demo
    models = root / "models"
    info = read_generator_info(models / "hywu" / "hywu_demo.safetensors")
    assert info.base_family == "sd15_ip2p" and info.config.rank == 8
    assert info.config.condition_norm == "token" and info.config.shared_rank == 8 and info.config.film
    assert (models / "checkpoints" / "hywu_demo_sd15_ip2p.safetensors").is_file()
    shared = load_file(models / "loras" / "hywu_demo_shared_lora.safetensors")
    assert shared and all(k.startswith("lora_unet_") for k in shared)  # kohya names, as core LoraLoader reads them
    for task in synthetic.ADAPTER_TASKS:
        per_task = load_file(models / "loras" / f"hywu_demo_{task}.safetensors")
        assert per_task.keys() == shared.keys()


def test_comfyui_ran_the_demo_workflow_and_the_core_lora_graph(quick_demo):
    import hywu_demo as demo

    root, result, *_ = quick_demo
    c = result["comfyui"]
    assert c.get("ran"), c.get("error")
    hywu = [e for e in c["edits"] if e["method"] == "hywu"]
    shared = [e for e in c["edits"] if e["method"] == "shared_lora"]
    assert {e["task"] for e in hywu} == set(demo.COMFY_PAIR) and len(shared) == 1
    for e in c["edits"]:
        img = np.asarray(Image.open(root / "out" / e["file"]))
        assert img.shape == (32, 32, 3) and _finite(e["psnr"])
    # Same seed, same sampler: ComfyUI makes the in-process edit. The generated LoRA runs at
    # runtime in float32; LoraLoaderModelOnly merges into the fp16 checkpoint's weights.
    assert all(e["psnr_vs_inprocess"] > 40 for e in hywu), hywu
    assert shared[0]["psnr_vs_inprocess"] > 25, shared


def test_second_run_reuses_the_cache(quick_demo):
    _, first, second, _ = quick_demo
    assert [k for k in first["timings_s"] if k.startswith(("build the demo base", "train "))]
    assert not [k for k in second["timings_s"] if k.startswith(("build the demo base", "train ", "export"))]
    # same files, same seeds: same numbers
    a, b = first["metrics"]["val"]["hywu"]["overall"], second["metrics"]["val"]["hywu"]["overall"]
    assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-6)


def test_log_has_no_bar_frames_and_ends_with_the_stage_timings(quick_demo):
    root, first, second, log = quick_demo
    assert "\r" not in log and "|#" not in log and "it/s]" not in log and "s/it]" not in log, log[-3000:]
    for f in (root / "models" / "demo" / "runs").glob("*.log"):  # the trainer subprocesses' logs
        text = f.read_text()
        assert "\r" not in text and "it/s]" not in text and "s/it]" not in text, (f, text[-2000:])
    rows = first["stage_timings"]
    tail = log.rstrip().splitlines()[-(len(rows) + 3):]
    assert tail[0] == "stage timings" and tail[1].split() == ["stage", "seconds", "cached"], tail
    for r, line in zip(rows, tail[2:]):
        assert line.startswith(r["stage"]) and line.split()[-2:] == [f"{r['seconds']:.1f}", "yes" if r["cached"] else "no"]
    # the total is the demo's wall time: at least the stages' sum, up to the rounding to 0.1 s of each row
    # and of the total (0.05 s each)
    slack = 0.05 * (len(rows) + 1) + 1e-6
    assert tail[-1].split()[0] == "total" and float(tail[-1].split()[1]) >= sum(r["seconds"] for r in rows) - slack
    names = [r["stage"] for r in rows]
    assert any(n.startswith("build the demo base") for n in names) and any(n.startswith("train ") for n in names)
    assert not any(r["cached"] for r in rows if not r["stage"].startswith("micro base"))  # first run: built here
    m = json.loads((root / "out" / "metrics.json").read_text())  # the second run's file: everything reused
    again = {r["stage"]: r for r in m["stage_timings"]}
    assert again["build the demo base"]["cached"] and again["train hywu (seed 0)"]["cached"]
    assert all(_finite(r["seconds"]) and r["seconds"] >= 0 for r in m["stage_timings"])
    assert [r["stage"] for r in second["stage_timings"]] == list(again)


def test_script_modules_resolve_with_a_demo_folder_next_to_the_checkout(tmp_path):
    """The repo root is a package (ComfyUI imports it), so pytest puts the checkout's parent first
    on sys.path, and in a ComfyUI install the siblings are other node packs. A parent holding
    `demo` and `demo_core` packages (the script names before issue 16) must not shadow the script
    modules this file imports. Reproduced in a temp parent with a one-test pytest run."""
    import re
    import subprocess

    scripts = REPO / "scripts"
    names = sorted({m for m in re.findall(r"^\s*import (\w+)", Path(__file__).read_text(), re.M)
                    if (scripts / f"{m}.py").is_file()})
    assert names and all(n.startswith("hywu_") for n in names), names  # the project's own prefix
    for sibling in ("demo", "demo_core"):
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "__init__.py").write_text("")
    pack = tmp_path / "pack"
    (pack / "tests").mkdir(parents=True)
    (pack / "__init__.py").write_text("")
    (pack / "tests" / "test_probe.py").write_text(f'''
import importlib.util, sys
from pathlib import Path
sys.path[:0] = [{str(REPO)!r}, {str(scripts)!r}]  # what tests/test_demo.py does

def test_probe():
    assert importlib.util.find_spec("demo").origin == {str(tmp_path / "demo" / "__init__.py")!r}, sys.path[:4]
    for name in {names!r}:
        assert Path(importlib.util.find_spec(name).origin) == Path({str(scripts)!r}) / (name + ".py"), name
''')
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pack / "tests")],
                         cwd=pack, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_run_cache_key_follows_the_parsed_config_not_its_comments(tmp_path, monkeypatch):
    import hywu_demo as demo

    (tmp_path / "hywu_demo_base.json").write_text(json.dumps({"settings_key": "abc"}))
    config = tmp_path / "demo.yaml"
    monkeypatch.setattr(demo, "CONFIG", config)
    config.write_text("train:\n  steps: 600\n")
    key = demo._run_key(tmp_path, "hywu", 0, [])
    config.write_text("# a new comment\ntrain:\n  steps: 600   # and another\n")
    assert demo._run_key(tmp_path, "hywu", 0, []) == key
    assert demo._run_key(tmp_path, "hywu", 1, []) != key and demo._run_key(tmp_path, "hywu", 0, ["--x=1"]) != key
    config.write_text("train:\n  steps: 601\n")
    assert demo._run_key(tmp_path, "hywu", 0, []) != key
