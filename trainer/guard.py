"""Non-finite steps: a NaN/inf loss or gradient skips the optimizer step (weights and AdamW
moments stay as they were), is counted and logged; a run of them stops training."""
from __future__ import annotations

import math


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message names the last good checkpoint."""


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped: list[int] = []  # steps (1-based) that were skipped

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """None when the step may be applied; otherwise the log line saying why it is skipped."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        self.skipped.append(step)
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        value = loss if not math.isfinite(loss) else grad_norm
        return (f"step {step}: non-finite {what} ({value}); optimizer step skipped "
                f"({self.in_a_row} in a row, {len(self.skipped)} in this run)")

    @property
    def should_stop(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def stop_message(self, step: int, last_checkpoint) -> str:
        where = (f"The last good checkpoint is {last_checkpoint}; continue from it with --resume"
                 if last_checkpoint else "No checkpoint was written yet, so a new run starts from step 0")
        return (f"training stopped at step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                f"(NaN/inf; train.max_nonfinite={self.max_in_a_row}). Skipped steps do not change the weights. "
                f"{where}, with a lower train.lr, train.max_grad_norm > 0, or train.mixed_precision=no "
                f"(fp16 overflows most often).")
