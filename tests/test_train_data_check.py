"""Data pre-flight (trainer/preflight.py): every row is checked before any model loads; the report
names rows, columns, sizes, instruction lengths, duplicates; no usable row is a clear error."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from trainer.config import ConfigError
from trainer.data import build_datasets
from trainer.preflight import DataError, check_data
from trainer.tiny_bases import tiny_config

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}


def _images(tmp_path, n, size=(48, 32)):
    for i in range(n):
        Image.new("RGB", size, (20 * i, 90, 200 - 20 * i)).save(tmp_path / f"s{i}.png")
        Image.new("RGB", size, (200 - 20 * i, 150, 20 * i)).save(tmp_path / f"t{i}.png")


def _manifest(tmp_path, rows, name="edits.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(tmp_path, path, **data):
    return tiny_config("sd15_ip2p", tmp_path / "run", data={"source": "manifest", "path": str(path), **data})


def test_report_rows_columns_sizes_lengths_duplicates(tmp_path):
    _images(tmp_path, 6)
    Image.new("RGB", (96, 32), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = [{"source_image": f"s{i}.png", "edited_image": f"t{i}.png", "edit_prompt": f"swap colours {i}", "note": "x"}
            for i in range(6)]
    rows = good + [
        {"source_image": "missing.png", "edited_image": "t0.png", "edit_prompt": "a"},   # line 7
        {"source_image": "broken.png", "edited_image": "t0.png", "edit_prompt": "b"},    # line 8
        {"source_image": "s1.png", "edit_prompt": "no target"},                          # line 9
        "{not json",                                                                     # line 10
        good[1],                                                                         # line 11: duplicate of line 2
        {"source_image": "s2.png", "edited_image": "s2.png", "edit_prompt": "same"},     # line 12: nothing to learn
        {"source_image": "wide.png", "edited_image": "t3.png", "edit_prompt": "long " * 90},  # line 13: > 77 tokens
        {"source_image": "small.png", "edited_image": "t3.png", "edit_prompt": "tiny"},  # line 14: below 32 px
    ]
    check = check_data(_cfg(tmp_path, _manifest(tmp_path, rows)))
    text = "\n".join(check.lines(32))
    rep = check.train
    assert rep.rows == 14 and len(rep.usable) == 10
    assert rep.counts() == {"corrupt image": 1, "image file missing": 1, "malformed JSONL line": 1, "missing target": 1}
    assert "skipped 1 x image file missing: edits.jsonl line 7 (missing.png, t0.png)" in text
    assert "skipped 1 x corrupt image: edits.jsonl line 8 (broken.png, t0.png)" in text
    assert "skipped 1 x missing target: edits.jsonl line 9 (s1.png)" in text
    assert "columns found: edit_prompt, edited_image, note, source_image" in text
    assert "used: source <- 'source_image', target <- 'edited_image', instruction <- 'edit_prompt'" in text
    assert "48x32 (8)" in text and "96x32 (1)" in text and "16x16 (1)" in text
    assert "1.50 " in text and "3.00 " in text and "1.00 " in text  # aspect histogram rows
    assert "1 row(s) have an image smaller than 32 px" in text and "edits.jsonl line 14" in text
    assert "1 instruction(s) are longer than 77 tokens" in text and "edits.jsonl line 13" in text  # the CLIP tokenizer counted
    assert "1 duplicate row(s)" in text and "edits.jsonl line 11 = edits.jsonl line 2" in text
    assert "1 row(s) have a source identical to the target" in text and "edits.jsonl line 12" in text
    assert "validation: 1 of the 10 usable rows held out" in text


def test_no_usable_rows_is_a_clear_error_before_any_model_loads(tmp_path):
    _images(tmp_path, 3)
    path = _manifest(tmp_path, [{"before": f"s{i}.png", "after": f"t{i}.png", "caption": "x"} for i in range(3)])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path, path).to_dict()))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(cfg)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Loading weights" not in r.stderr + r.stdout  # no model was loaded
    assert "error: no usable rows in" in r.stderr and "3 x missing source/target/instruction" in r.stderr
    assert "columns found: after, before, caption" in r.stderr
    assert "accepted column names: source: source, source_image, input_image, original_image" in r.stderr
    assert "edits.jsonl line 1" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    print(f"no-usable-rows error in {time.time() - t0:.1f} s")


def test_check_data_flag_reports_and_exits(tmp_path):
    _images(tmp_path, 4)
    path = _manifest(tmp_path, [{"source": f"s{i}.png", "target": f"t{i}.png", "instruction": "swap"} for i in range(4)])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path, path).to_dict()))
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(cfg), "--check-data"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "training data:" in r.stdout and "4 rows, 4 usable" in r.stdout and "training on 3 rows" in r.stdout
    assert "Loading weights" not in r.stdout + r.stderr and not (tmp_path / "run").exists()


def test_n_train_and_validation_split_mean_the_same_for_every_source(tmp_path):
    _images(tmp_path, 10, size=(32, 32))
    rows = [{"source": f"s{i}.png", "target": f"t{i}.png", "instruction": f"edit {i}"} for i in range(10)]
    path = _manifest(tmp_path, rows)
    train, val = build_datasets(_cfg(tmp_path, path, val_fraction=0.2))
    assert len(train) == 8 and len(val) == 2
    assert not {r["instruction"] for r in train.rows} & {r["instruction"] for r in val.rows}  # held out
    train2, val2 = build_datasets(_cfg(tmp_path, path, val_fraction=0.2, n_train=5))
    assert len(train2) == 5 and val2.rows == val.rows  # n_train takes the first training rows; the split stays
    extra = _manifest(tmp_path, rows[:3], "val.jsonl")
    train3, val3 = build_datasets(_cfg(tmp_path, path, val_path=str(extra)))
    assert len(train3) == 10 and len(val3) == 3
    syn, _ = build_datasets(tiny_config("sd15_ip2p", tmp_path / "s", data={"n_train": None}))
    assert len(syn) == 64  # the synthetic default
    syn8, _ = build_datasets(tiny_config("sd15_ip2p", tmp_path / "s", data={"n_train": 8}))
    assert len(syn8) == 8
    with pytest.raises(ConfigError, match="data.val_path applies to manifest/parquet/folders"):
        tiny_config("sd15_ip2p", tmp_path / "s", data={"val_path": str(extra)})
    with pytest.raises(DataError, match="no usable rows"):
        check_data(_cfg(tmp_path, _manifest(tmp_path, [{"source": "nope.png", "target": "t0.png", "instruction": "x"}], "bad.jsonl")))


def _folders(root, names_and_captions, controls):
    """target/<name> with <stem>.txt (caption None: no file) and control/<name> for the names in controls."""
    (root / "target").mkdir(parents=True)
    (root / "control").mkdir()
    for i, (name, caption) in enumerate(names_and_captions):
        Image.new("RGB", (48, 32), (200 - 20 * i, 150, 20 * i)).save(root / "target" / name)
        if caption is not None:
            (root / "target" / (Path(name).stem + ".txt")).write_text(caption)
    for i, name in enumerate(controls):
        Image.new("RGB", (48, 32), (20 * i, 90, 200 - 20 * i)).save(root / "control" / name)


def test_folders_dataset_pairs_targets_captions_and_sources(tmp_path):
    """data.source folders: a target folder with same-name .txt instructions and a control folder of
    sources with the same names (another image format counts); what is missing is a named bad row."""
    root = tmp_path / "edits"
    _folders(root, [("a.png", "make it red and blue\n"), ("b.jpg", "make it blue"), ("c.png", None), ("d.png", "x"),
                    ("e.png", "  "), ("f.png", "y")], ["a.png", "b.png", "c.png", "e.png", "f.png", "z.png"])
    # optional sidecars: a.json carries the task label and the chained edits; f.json is not an object
    (root / "target" / "a.json").write_text(json.dumps({"task": "recolour", "edits": ["make it red", "make it blue"]}))
    (root / "target" / "f.json").write_text("[1, 2]")
    check = check_data(_cfg(tmp_path, root, source="folders", val_fraction=0))
    rep = check.train
    assert rep.rows == 7 and len(rep.usable) == 2
    assert rep.counts() == {"no instruction file (.txt) beside the target image": 1, "empty instruction file": 1,
                            "no source image of the same name in the control folder": 1,
                            "sidecar .json is not a JSON object": 1,
                            "source image without a target of the same name": 1}
    report = "\n".join(check.lines(32))
    assert "target/c.png" in report and "control/z.png" in report  # rows are named by their files
    train, _ = build_datasets(_cfg(tmp_path, root, source="folders", val_fraction=0), usable=rep.usable)
    rows = [train.load(i, 32) for i in range(len(train))]
    assert [r["instruction"] for r in rows] == ["make it red and blue", "make it blue"]
    assert rows[0]["edits"] == ("make it red", "make it blue") and rows[0]["task"] == "recolour" and rows[1]["edits"] == ()
    assert all(r["source"].shape == r["target"].shape == (3, 32, 32) for r in rows)
    assert not torch.equal(rows[0]["source"], rows[0]["target"])
    # the other layout: targets in data.path, sources in data.control_path (ai-toolkit's folder_path /
    # control_path, accepted under those names in a config file)
    cfg = tmp_path / "c.yaml"
    data = {**_cfg(tmp_path, root).to_dict(), "name": "folders"}
    data["data"] = {"source": "folders", "folder_path": str(root / "target"), "control_path": str(root / "control"),
                    "val_fraction": 0}
    cfg.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(cfg), "--check-data"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "7 rows, 2 usable" in r.stdout, r.stdout
    with pytest.raises(FileNotFoundError, match="data.control_path is empty"):
        check_data(_cfg(tmp_path, root / "target", source="folders"))


def test_folders_dataset_trains_with_previews_on_your_images(tmp_path):
    """Two steps of `python -m trainer.train` on a folders dataset with train.samples (ai-toolkit's
    ctrl_img / prompt names accepted): it trains, writes the generator, and a preview grid of the
    user's own images (your image | base | generated LoRA, one row each)."""
    root = tmp_path / "edits"
    _folders(root, [(f"{i}.png", f"edit number {i}") for i in range(6)], [f"{i}.png" for i in range(6)])
    Image.new("RGB", (40, 64), (10, 200, 60)).save(tmp_path / "mine.png")  # not a dataset image, not square
    cfg = tmp_path / "c.yaml"
    data = _cfg(tmp_path, root, source="folders").to_dict()
    data["train"].update(max_steps=2, batch_size=2, validate_every=0, samples=[
        {"image": str(tmp_path / "mine.png"), "instruction": "make it purple"},
        {"ctrl_img": str(root / "control" / "0.png"), "prompt": "make it darker"}])
    data["data"].update(n_val=1)
    cfg.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(cfg)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and (tmp_path / "run" / f"{data['name']}.safetensors").is_file()
    preview = Image.open(summary["previews"])
    assert preview.size == (3 * 128, 16 + 2 * (128 + 16))  # 3 columns of 32 px cells shown at 128 px, 2 rows
    assert "previews on your images" in r.stdout
    with pytest.raises(ConfigError, match=r"train.samples\[0\].image: no such image file"):
        tiny_config("sd15_ip2p", tmp_path / "s", train={"samples": [{"image": "nope.png", "instruction": "x"}]})
