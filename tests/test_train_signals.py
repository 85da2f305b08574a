"""Interrupts and reproducibility of real `python -m trainer.train` processes.

SIGINT / SIGTERM: the step finishes, a checkpoint is written, one line gives the step and the
--resume command, exit code 75; a second signal exits at once (130 / 143) and keeps the last
complete checkpoint; a signal that lands while a checkpoint is written lets that write complete.
The resumed run equals the uninterrupted one bit for bit (same machine, same thread count), and
two runs of one config give the same weights (the micro base: 2 threads differed without
deterministic kernels)."""
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from trainer.state import latest_checkpoint
from trainer.tiny_bases import tiny_config

REPO = Path(__file__).resolve().parent.parent
# 2 threads: where the micro base's kernels differed from run to run. PASSIVE: OpenMP threads that
# spin while waiting made tiny steps 80x slower (2.8 s against 0.035 s) on this shared 2-core machine.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
STEPS = 60  # tiny steps take ~0.05 s: the signal sent after step 4 must land well before the end


def _config(tmp_path, name, **train) -> Path:
    cfg = tiny_config("sd15_ip2p", tmp_path / name, data={"n_train": 12, "n_val": 1},
                      train={"max_steps": STEPS, "batch_size": 2, "device": "cpu", "drop_text": 0.3, "drop_image": 0.3,
                             "log_every": 1, **train})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _start(tmp_path, cfg: Path, *args, script: str | None = None) -> subprocess.Popen:
    out, err = open(tmp_path / f"{cfg.stem}.out", "w"), open(tmp_path / f"{cfg.stem}.err", "w")
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "trainer.train", "--config", str(cfg), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err)


def _text(tmp_path, cfg, kind="out") -> str:
    return (tmp_path / f"{cfg.stem}.{kind}").read_text()


def _wait_for(proc, tmp_path, cfg, needle, kind="out", timeout=240):
    t0 = time.time()
    while needle not in _text(tmp_path, cfg, kind):
        assert proc.poll() is None, f"exited ({proc.returncode}) before '{needle}':\n{_text(tmp_path, cfg, 'err')[-3000:]}"
        assert time.time() - t0 < timeout, f"no '{needle}' after {timeout} s"
        time.sleep(0.05)


def _weights(out: Path) -> dict:
    return load_file(str(out / "tiny_sd15_ip2p.safetensors"))


def _assert_same(a, b):
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ: max {max((a[k] - b[k]).abs().max().item() for k in bad):.3g}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (another save_every than the interrupted ones: it must not matter)."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _config(tmp, "ref", save_every=0)
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(cfg)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "use it in ComfyUI: cp " in r.stdout and "models/hywu/" in r.stdout
    return _weights(tmp / "ref")


def _resume_from_printed_line(stdout: str) -> tuple[int, list[str]]:
    m = re.search(r"stopped by SIG\w+ after step (\d+): checkpoint \S+\. Continue with: (.+)", stdout)
    assert m, stdout[-2000:]
    cmd = shlex.split(m.group(2))
    assert cmd[:3] == ["python", "-m", "trainer.train"] and "--resume" in cmd
    return int(m.group(1)), [sys.executable, *cmd[1:]]


def test_sigint_checkpoints_and_resume_continues(reference, tmp_path):
    """Ctrl-C (SIGTERM, what SLURM and docker stop send, is the next test's signal)."""
    cfg = _config(tmp_path, "run", save_every=5)
    proc = _start(tmp_path, cfg)
    _wait_for(proc, tmp_path, cfg, "estimate:")  # printed after the first 4 steps
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=240) == 75, _text(tmp_path, cfg, "err")[-3000:]
    out, err = _text(tmp_path, cfg), _text(tmp_path, cfg, "err")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    step, cmd = _resume_from_printed_line(out)
    assert 4 <= step < STEPS
    root = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(root).name == f"step-{step:08d}"  # the step the line names, complete
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {root / f'step-{step:08d}'} (step {step}" in r.stdout
    _assert_same(reference, _weights(tmp_path / "run"))


def test_second_signal_exits_at_once_even_mid_write(tmp_path):
    """The second Ctrl-C lands while the checkpoint of the first is being written (held there, so
    the timing is certain): the process ends at once and the last complete checkpoint stays."""
    cfg = _config(tmp_path, "twice", save_every=2)
    flag, inside = tmp_path / "signalled", tmp_path / "inside"
    script = textwrap.dedent(f"""
        import os, sys, time
        import trainer.state as st
        real = st.save_file
        def save_file(tensors, path, *a, **k):
            if os.path.exists({str(flag)!r}):  # the test sends the first signal now: hold this write
                open({str(inside)!r}, "w").close()
                time.sleep(120)
            return real(tensors, path, *a, **k)
        st.save_file = save_file
        from trainer.train import main
        sys.exit(main(["--config", {str(cfg)!r}]))
    """)
    proc = _start(tmp_path, cfg, script=script)
    _wait_for(proc, tmp_path, cfg, "estimate:")
    flag.touch()
    proc.send_signal(signal.SIGINT)
    _wait_for(proc, tmp_path, cfg, "finishing this step", kind="err")  # the first one was handled
    t0 = time.time()
    while not inside.exists():
        assert proc.poll() is None and time.time() - t0 < 120, _text(tmp_path, cfg, "err")[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = _text(tmp_path, cfg, "err")
    assert "SIGINT again: exiting now without a checkpoint" in err and "Traceback" not in err
    assert "Continue with" not in _text(tmp_path, cfg)
    root = tmp_path / "twice" / "checkpoints"
    assert list(root.glob(".tmp-step-*"))  # the write it cut
    found = latest_checkpoint(root)  # the last complete one, at or after step 2
    assert found is not None and int(found.name.split("-")[1]) >= 2 and (found / "state.json").is_file()


def test_signal_during_checkpoint_write(reference, tmp_path):
    """SIGTERM while step 4's state is being written: that write completes and is the checkpoint."""
    cfg = _config(tmp_path, "mid", save_every=4)
    script = textwrap.dedent(f"""
        import os, signal, sys
        import trainer.state as st
        real = st.save_file
        def save_file(tensors, path, *a, **k):
            if "step-00000004" in str(path) and "model-" in str(path):
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, half way through the checkpoint
            return real(tensors, path, *a, **k)
        st.save_file = save_file
        from trainer.train import main
        sys.exit(main(["--config", {str(cfg)!r}]))
    """)
    proc = _start(tmp_path, cfg, script=script)
    assert proc.wait(timeout=240) == 75, _text(tmp_path, cfg, "err")[-3000:]
    step, cmd = _resume_from_printed_line(_text(tmp_path, cfg))
    assert step == 4
    root = tmp_path / "mid" / "checkpoints"
    assert latest_checkpoint(root).name == "step-00000004" and not list(root.glob(".tmp-*"))
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(reference, _weights(tmp_path / "mid"))


def test_same_config_gives_the_same_weights(micro_base, tmp_path):
    """Two runs on the micro base (a 320-wide UNet, 2 threads), only save_every differing: without
    deterministic kernels they differed from run to run (4e-7 after 8 steps at 32 px, 1e-3 after
    12 steps at 64 px)."""
    files = []
    for name, save_every in (("a", 1), ("b", 0)):
        cfg = tiny_config("sd15_ip2p", tmp_path / name, base={"path": str(micro_base.diffusers_dir)},
                          data={"n_train": 4, "n_val": 1},
                          train={"max_steps": 3, "batch_size": 2, "device": "cpu", "save_every": save_every})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict()))
        r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(path)], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("seeded micro test base") == 1  # said once, with where real bases go
        files.append(load_file(str(tmp_path / name / "tiny_sd15_ip2p.safetensors")))
    _assert_same(*files)
