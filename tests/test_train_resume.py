"""Resume: stopping at step k and resuming reaches the same weights as an uninterrupted run, and
a SIGKILL while a checkpoint is being written leaves the previous one usable."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.state import latest_checkpoint
from trainer.tiny_bases import tiny_config
from trainer.train import run

REPO = Path(__file__).resolve().parent.parent
STEPS = 6


@pytest.fixture(autouse=True)
def deterministic():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(n)


def _cfg(out, **train):
    # Cosine schedule and dropout on: the resumed run must restore the LR schedule and RNG-driven choices.
    return tiny_config("sd15_ip2p", out, data={"n_train": 12},
                       train={"max_steps": STEPS, "batch_size": 2, "lr_schedule": "cosine", "warmup_steps": 2,
                              "drop_text": 0.3, "drop_image": 0.3, **train})


def _weights(summary):
    return load_file(summary["files"][0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return _weights(run(_cfg(tmp_path_factory.mktemp("ref")), progress=False))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}: max diff {max((a[k] - b[k]).abs().max().item() for k in bad):.3g}"


def test_stop_and_resume_matches_uninterrupted(reference, tmp_path):
    paused = run(_cfg(tmp_path), progress=False, stop_after=3)  # checkpoint at step 3, exit
    assert paused["paused"] and paused["steps"] == 3
    summary = run(_cfg(tmp_path), resume=True, progress=False)
    assert summary["resumed_from"] == 3
    _assert_same(reference, _weights(summary))


def test_sigkill_during_checkpoint_write_keeps_previous(reference, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1); torch.use_deterministic_algorithms(True)
        import trainer.state as st
        real = st.save_file
        def dying_save(tensors, path, *a, **k):
            if "step-00000004" in str(path):  # generator file already in the temp folder, state half way
                os.kill(os.getpid(), signal.SIGKILL)
            return real(tensors, path, *a, **k)
        st.save_file = dying_save
        import sys; sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_train_resume import _cfg
        from trainer.train import run
        run(_cfg({str(tmp_path)!r}, save_every=2), progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert list(root.glob(".tmp-step-00000004-*")), "the kill should have hit the step-4 save"
    assert latest_checkpoint(root).name == "step-00000002"
    summary = run(_cfg(tmp_path, save_every=2), resume=True, progress=False)
    assert summary["resumed_from"] == 2
    assert not list(root.glob(".tmp-*")), "the next save removes the dead temp folder"
    _assert_same(reference, _weights(summary))
