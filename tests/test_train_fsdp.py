"""FSDP2 on 2 CPU processes (torchrun, gloo): the generator and the frozen base sharded equals one
unsharded process with the same global batch, and sharded checkpoints resume in another process
count (2 sharded -> 1 plain, 1 plain -> 2 sharded) to the same weights."""
import json
import shutil

import pytest
import torch

from test_train_ddp import STEPS, _launch


def _rel_diff(a, b):
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-8)).item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    single = _launch(tmp, "single", 1, 4, save_every=2)
    sharded = _launch(tmp, "sharded", 2, 2, save_every=2, fsdp=True, fsdp_shard_base=True)
    return tmp, single, sharded


def _resume_from(tmp, source, name, nproc, batch, **train):
    """Copy ``source``'s step-2 checkpoint into a fresh run folder and finish the run there."""
    ckpt = tmp / name / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copytree(tmp / source / "checkpoints" / "step-00000002", ckpt / "step-00000002")
    (ckpt / "latest").write_text("step-00000002")
    return _launch(tmp, name, nproc, batch, args=("--resume",), save_every=2, **train)


def test_two_sharded_processes_match_one(runs):
    tmp, (s1, w1), (s2, w2) = runs
    assert s2["sharded"] == {"fsdp": True, "base": True} and s2["processes"] == 2 and s2["global_batch"] == 4
    assert _rel_diff(w1, w2) < 3e-3  # as in test_train_ddp: reduction-order noise, amplified by Adam
    head_b = [k for k in w1 if k.startswith("head_b")][0]
    assert w1[head_b].abs().sum() > 0  # both runs really trained
    assert abs(s1["final_loss"] - s2["final_loss"]) < 1e-3 * max(1.0, abs(s1["final_loss"]))
    meta = json.loads((tmp / "sharded" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert meta["sharded"] and meta["processes"] == 2
    assert len(list((tmp / "sharded" / "checkpoints" / "step-00000002" / "state").glob("*.safetensors"))) == 2  # one shard each


def test_sharded_checkpoint_resumes_in_one_plain_process(runs):
    tmp, (s1, w1), _ = runs
    s, w = _resume_from(tmp, "sharded", "resume_1", 1, 4)
    assert s["resumed_from"] == 2 and s["sharded"]["fsdp"] is False
    assert _rel_diff(w1, w) < 3e-3  # as in test_train_ddp: reduction-order noise, amplified by Adam


def test_plain_checkpoint_resumes_sharded(runs):
    tmp, (s1, w1), _ = runs
    s, w = _resume_from(tmp, "single", "resume_2", 2, 2, fsdp=True)
    assert s["resumed_from"] == 2 and s["sharded"]["fsdp"] is True
    assert _rel_diff(w1, w) < 3e-3  # as in test_train_ddp: reduction-order noise, amplified by Adam


def test_one_process_fsdp_bf16(tmp_path):
    """The single-GPU path of bench/gpu_check.sh: FSDP in one process with bf16 mixed precision
    (fp32 master weights, bf16 compute, fp32 gradient reduction)."""
    s, w = _launch(tmp_path, "bf16", 1, 2, fsdp=True, mixed_precision="bf16")
    assert s["sharded"]["fsdp"] and s["mixed_precision"] == "bf16" and s["steps"] == STEPS
    assert all(v.dtype == torch.float32 for v in w.values())  # master weights stay fp32 in the file
    assert all(x is not None and x == x for x in s["losses"])
