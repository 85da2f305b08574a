"""SIGINT / SIGTERM: finish the step, checkpoint, say how to resume, exit with EXIT_INTERRUPTED.

Ctrl-C sends SIGINT; SLURM preemption, ``docker stop`` and ``kill`` send SIGTERM. The first one
only sets a flag that the training loop reads after each optimizer step (all processes of a
data-parallel run agree on it, so they stop at the same step and write one checkpoint). A second
signal ends the process at once (``os._exit``: 130 after SIGINT, 143 after SIGTERM, the shell's
codes); the checkpoint writer is atomic, so the previous complete checkpoint stays usable even if
that lands in the middle of a write.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading

EXIT_INTERRUPTED = 75  # sysexits EX_TEMPFAIL: "try again later" (a scheduler may requeue on it)


class StopRequest:
    """Installs the handlers while the trainer runs (main thread only; a no-op elsewhere)."""

    def __init__(self, enabled: bool = True, is_main: bool = True):
        self.signum: int | None = None
        self.is_main = is_main
        self._old: dict = {}
        self.enabled = enabled and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if self.is_main:
                os.write(2, f"\n{signal.Signals(signum).name} again: exiting now without a checkpoint "
                            "(the last complete one is kept)\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        if self.is_main:
            os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                        "(send it again to exit at once)\n".encode())

    def requested(self, group=None) -> bool:
        """True when any process got a signal (collective when ``group`` has several processes)."""
        flag = self.signum is not None
        return group.any_true(flag) if group is not None and group.world > 1 else flag


def resume_command(argv: list[str] | None = None) -> str:
    """The command line of this run with ``--resume`` added (``python -m trainer.train ... --resume``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in args:
        args.append("--resume")
    cmd = shlex.join(["python", "-m", "trainer.train", *args])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return cmd if world == 1 else f"{cmd}  (launched the way this run was, e.g. accelerate launch / torchrun, {world} processes)"
