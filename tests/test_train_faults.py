"""Trainer faults: a non-finite loss or gradient skips the step (counted, logged); a run of them
stops training with a message naming the last good checkpoint; a checkpoint write that fails
(disk full) leaves the previous checkpoint usable and says so."""
import errno
import json

import pytest
import torch
from safetensors.torch import load_file

import trainer.state as state
from trainer.families.sd15_ip2p import SD15IP2P
from trainer.guard import TrainingDiverged
from trainer.state import CheckpointWriteError, latest_checkpoint
from trainer.tiny_bases import tiny_config
from trainer.train import main, run


class _NanGrad(torch.autograd.Function):
    """Identity forward (a finite loss), NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _inject(monkeypatch, bad: dict):
    """Make the loss ("loss") or only its gradient ("gradient") non-finite on the given 1-based
    steps (grad_accum 1): ``bad = {step: kind}``."""
    real, calls = SD15IP2P.loss, [0]

    def loss(self, prep):
        calls[0] += 1
        out = real(self, prep)
        kind = bad.get(calls[0])
        if kind:
            return out * float("inf") if kind == "loss" else _NanGrad.apply(out)
        return out

    monkeypatch.setattr(SD15IP2P, "loss", loss)


def _cfg(out, **train):
    return tiny_config("sd15_ip2p", out, data={"n_train": 8}, train={"max_steps": 6, "batch_size": 2, "device": "cpu",
                                                                     "keep_checkpoints": 10, **train})


def _gen(root, step):
    return load_file(str(root / "checkpoints" / f"step-{step:08d}" / "tiny_sd15_ip2p.safetensors"))


def test_nonfinite_steps_are_skipped_counted_and_logged(tmp_path, monkeypatch, capsys):
    _inject(monkeypatch, {2: "loss", 4: "gradient"})
    s = run(_cfg(tmp_path, save_every=1), progress=False)
    assert s["nonfinite_steps_skipped"] == [2, 4]
    assert [i for i, x in enumerate(s["losses"]) if x is None] == [1, 3]
    err = capsys.readouterr().err
    assert "step 2: non-finite loss (inf)" in err and "step 4: non-finite gradient norm (nan)" in err
    assert "checkpoint at step 2 skipped" in err  # the last checkpoint stays a good one
    root = tmp_path / "checkpoints"
    assert not (root / "step-00000002").exists()
    # AdamW took 2 steps by step 3 (step 2 was skipped) while the LR schedule went on
    meta = json.loads((root / "step-00000003" / "state.json").read_text())
    assert meta["optimizer"]["scalars"]["0.step"]["value"] == 2.0 and meta["scheduler"]["last_epoch"] == 3
    w1, w3 = _gen(tmp_path, 1), _gen(tmp_path, 3)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)  # the next step trains again
    assert all(torch.isfinite(v).all() for v in load_file(s["files"][0]).values())


def test_run_of_nonfinite_steps_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _inject(monkeypatch, dict.fromkeys((3, 4, 5, 6), "loss"))
    with pytest.raises(TrainingDiverged) as e:
        run(_cfg(tmp_path, save_every=2, max_nonfinite=3), progress=False)
    msg = str(e.value)
    assert "stopped at step 5" in msg and "3 steps in a row" in msg and "step-00000002" in msg and "--resume" in msg
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000002"  # step 4 (in the streak) was not saved
    monkeypatch.undo()
    s = run(_cfg(tmp_path, save_every=2, max_nonfinite=3), resume=True, progress=False)  # the kept checkpoint resumes
    assert s["resumed_from"] == 2 and s["steps"] == 6


def test_cli_exit_code_on_divergence(tmp_path, monkeypatch, capsys):
    import yaml

    _inject(monkeypatch, dict.fromkeys(range(1, 10), "loss"))
    cfg = _cfg(tmp_path, max_nonfinite=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["--config", str(path)]) == 3
    assert "error: training stopped at step 2" in capsys.readouterr().err


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real = state.save_file

    def full_disk(tensors, path, *a, **k):
        if "step-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(state, "save_file", full_disk)
    s = run(_cfg(tmp_path, save_every=2), progress=False)
    err = capsys.readouterr().err
    assert "checkpoint step-00000004 could not be written (No space left on device)" in err
    assert "step-00000002 is intact and --resume continues from it" in err
    assert s["checkpoint_failures"] == [4] and s["steps"] == 6  # training went on
    root = tmp_path / "checkpoints"
    assert not list(root.glob(".tmp-*")) and not (root / "step-00000004").exists()
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000006"]
    # the checkpoint before the failure still resumes
    (root / "latest").write_text("step-00000002")
    import shutil

    shutil.rmtree(root / "step-00000006")
    monkeypatch.undo()
    s2 = run(_cfg(tmp_path, save_every=2), resume=True, progress=False)
    assert s2["resumed_from"] == 2


def test_final_checkpoint_failure_is_an_error(tmp_path, monkeypatch):
    real = state.save_file
    monkeypatch.setattr(state, "save_file", lambda t, p, *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
                        if "step-00000006" in str(p) else real(t, p, *a, **k))
    with pytest.raises(CheckpointWriteError, match="step-00000004 is intact"):
        run(_cfg(tmp_path, save_every=4), progress=False)
