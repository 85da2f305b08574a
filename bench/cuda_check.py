"""Prepared CUDA check: a few hundred steps of the tiny SD1.5 config in bf16, printing step time
and peak memory as JSON. Runs on CPU too (``--device cpu``) as a smoke test.

    python bench/cuda_check.py                      # CUDA, 300 steps, bf16
    python bench/cuda_check.py --device cpu --steps 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "no"))
    p.add_argument("--output", default=None, help="run folder (default: a temporary folder)")
    args = p.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device visible; use --device cpu for a smoke test"}))
        return 1
    if args.device == "cpu":
        torch.set_num_threads(1)
    from trainer.tiny_bases import tiny_config
    from trainer.train import run

    out = args.output or tempfile.mkdtemp(prefix="hywu_cuda_check_")
    cfg = tiny_config("sd15_ip2p", out, fast=False, data={"n_train": 256},
                      train={"max_steps": args.steps, "batch_size": args.batch, "device": args.device,
                             "mixed_precision": args.precision, "save_every": max(1, args.steps // 2), "log_every": 10})
    t0 = time.perf_counter()
    s = run(cfg, progress=False, check_frozen=True)
    times = s["step_times"][min(5, len(s["step_times"]) - 1):]  # skip warm-up (cuDNN autotune, allocator)
    result = {
        "ok": all(s["frozen_unchanged"].values()) and s["final_loss"] == s["final_loss"],
        "device": s["device"], "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "torch": torch.__version__, "precision": args.precision, "steps": args.steps, "batch": args.batch,
        "median_step_s": statistics.median(times), "samples_per_s": s["samples_per_s"], "peak_memory_mb": s["peak_memory_mb"],
        "first_loss": s["first_loss"], "mean_loss_last_10": s["mean_loss_last_10"], "frozen_unchanged": s["frozen_unchanged"],
        "total_s": time.perf_counter() - t0, "generator_file": s["files"][0],
    }
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
