"""Trainer pieces without training: config, data sources and bad rows, checkpoint files, errors."""
import io
import json

import pytest
import torch
from PIL import Image

from trainer.config import ConfigError
from trainer.data import BatchStream, read_manifest, read_parquet_folder
from trainer.state import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.train import main, parse_args


def _img(path, colour):
    Image.new("RGB", (40, 24), colour).save(path)
    return path.name


def test_config_overrides_and_errors(tmp_path):
    cfg, args = parse_args(["--max-steps", "7", "--seed", "3", "--train.lr=5e-4", "--base.targets=[to_q]", "--output", str(tmp_path)])
    assert cfg.train.max_steps == 7 and cfg.train.seed == 3 and cfg.train.lr == 5e-4 and cfg.base.targets == ["to_q"]
    assert cfg.output == str(tmp_path)
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'.*known here: .*lr"):
        parse_args(["--train.lrr=1"])
    with pytest.raises(ConfigError, match="train.method 'x'"):
        parse_args(["--train.method=x"])
    with pytest.raises(ConfigError, match="train.batch_size must be int"):
        parse_args(["--train.batch_size=abc"])


def test_help_mentions_every_section(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("--resume", "--output", "--max-steps", "--seed", "base.family", "data.source", "train.method", "summary.json"):
        assert word in out


def test_missing_base_folder_fails_at_start(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main([f"--base.path={missing}", "--base.tiny=false", f"--output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "unet/" in err and "text_encoder/" in err
    (tmp_path / "half" / "unet").mkdir(parents=True)
    (tmp_path / "half" / "unet" / "config.json").write_text("{}")
    assert main([f"--base.path={tmp_path / 'half'}", "--base.tiny=false", f"--output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "missing text_encoder/" in err and "vae/" in err


def _bad_manifest(tmp_path):
    good = [{"source": _img(tmp_path / f"s{i}.png", (10 * i, 0, 0)), "target": _img(tmp_path / f"t{i}.png", (0, 10 * i, 0)),
             "instruction": f"edit {i}", "task": "a" if i % 2 else "b"} for i in range(6)]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = good + [
        {"source": "s0.png", "target": "t0.png"},  # no instruction
        {"source": "corrupt.png", "target": "t0.png", "instruction": "x"},
        {"source": "gone.png", "target": "t0.png", "instruction": "x"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.jsonl"


def test_bad_rows_are_skipped_and_counted(tmp_path):
    ds = read_manifest(_bad_manifest(tmp_path))
    assert len(ds) == 10 and ds.tasks == ["a", "b"]
    stream = BatchStream(ds, batch_size=5, resolution=16, seed=0)
    for _ in range(6):  # several epochs: each bad row is counted once
        b = stream.next_batch()
        assert b["source"].shape == (5, 3, 16, 16) and b["target"].max() <= 1
    assert dict(stream.skipped) == {"missing instruction": 1, "malformed JSONL line": 1, "corrupt image": 1, "image file missing": 1}


def test_csv_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _img(tmp_path / "a.png", (255, 0, 0))
    _img(tmp_path / "b.png", (0, 0, 255))
    (tmp_path / "m.csv").write_text("input_image,edited_image,edit_prompt\na.png,b.png,make it blue\n")
    item = read_manifest(tmp_path / "m.csv").load(0, 16)
    assert item["instruction"] == "make it blue" and item["source"][0].mean() > 0.9 and item["target"][2].mean() > 0.9

    def png(c):
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), c).save(buf, format="PNG")
        return buf.getvalue()

    (tmp_path / "pq").mkdir()
    table = pa.table({"original_image": [{"bytes": png((0, 255, 0)), "path": "x.png"}, {"bytes": b"junk", "path": None}],
                      "edited_image": [{"bytes": png((0, 0, 0)), "path": None}] * 2, "edit_prompt": ["darken", "y"]})
    pq.write_table(table, tmp_path / "pq" / "train-00000.parquet")
    ds = read_parquet_folder(tmp_path / "pq")
    assert ds.load(0, 16)["source"][1].mean() > 0.9
    stream = BatchStream(ds, 2, 16, 0)
    stream.next_batch()
    assert stream.skipped == {"corrupt image": 1}


def test_checkpoint_roundtrip_and_latest(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    save_checkpoint(tmp_path, 1, m, opt, sched, [{"epoch": 0, "cursor": 4}], lambda f: None, {"x": 1})
    save_checkpoint(tmp_path, 2, m, opt, sched, [{"epoch": 0, "cursor": 8}], lambda f: None, {"x": 1})
    save_checkpoint(tmp_path, 3, m, opt, sched, [{"epoch": 0, "cursor": 12}], lambda f: None, {"x": 1}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    # A save that died half way (temp folder, no rename) is ignored; latest stays complete.
    (tmp_path / ".tmp-step-00000004-1").mkdir()
    found = latest_checkpoint(tmp_path)
    assert found.name == "step-00000003"
    m2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    meta = load_checkpoint(found, m2, opt2, sched2)
    assert meta["step"] == 3 and meta["data"][0]["cursor"] == 12
    assert torch.equal(m.weight, m2.weight)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert sched2.last_epoch == sched.last_epoch
    # A pointer to a deleted folder falls back to the newest complete one.
    (tmp_path / "latest").write_text("step-00000009")
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    # No pickle anywhere: the state is safetensors + JSON.
    assert {p.suffix for p in found.rglob("*") if p.is_file()} <= {".safetensors", ".json"}
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_min_snr_weighting():
    """train.snr_gamma: min(SNR, gamma) / SNR per sample on the DDPM schedule; refused for flow families."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from trainer.families.sd15_ip2p import SD15IP2P

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    adapter = SD15IP2P.__new__(SD15IP2P)
    adapter.scheduler = sched
    adapter.cfg = SimpleNamespace(train=SimpleNamespace(snr_gamma=0.0))
    t = torch.tensor([0, 100, 500, 999])
    assert adapter.loss_weights({"t": t}) is None
    adapter.cfg.train.snr_gamma = 5.0
    w = adapter.loss_weights({"t": t})
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 0.01 and w[-1] == 1.0  # the nearly clean step is down-weighted, the noisiest kept
    with pytest.raises(ConfigError, match="train.snr_gamma weights the noise-prediction loss of sd15_ip2p; flux_kontext"):
        parse_args(["--base.family=flux_kontext", "--train.snr_gamma=5", "--base.path=x"])
    with pytest.raises(ConfigError, match="train.snr_gamma must be 0"):
        parse_args(["--train.snr_gamma=-1"])
