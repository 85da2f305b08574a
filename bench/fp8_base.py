#!/usr/bin/env python
"""An fp8 frozen base in the miniature world: what storing the base in fp8 during training costs the generator.

HY-WU generators are trained by `python -m trainer.train` with the demo's config and budget
(trainer/configs/demo.yaml, on the `make demo` base), once against the ordinary base and once with
``--base.weight_dtype`` fp8 (trainer/fp8_base.py), for each seed; every generator is then evaluated on the
ordinary base (what a user samples with), on the demo's val split (16 images per task, 8 euler steps, cfg 1),
as `make demo` evaluates. Prints JSON: val PSNR per seed, mean and spread per weight dtype, and the per-seed
difference fp8 - ordinary with its mean and spread.

    python bench/fp8_base.py [--seeds 0,1,2] [--weight-dtype fp8_e4m3fn|fp8_scaled] [--quick]

The base is built (or reused) under models/ as `make demo` builds it; --quick uses models/quick/ and tiny
step counts (numbers meaningless, for tests of the script).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hywu_demo as demo  # noqa: E402
import hywu_demo_core as D  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--weight-dtype", default="fp8_e4m3fn", choices=("fp8_e4m3fn", "fp8_scaled"))
    ap.add_argument("--quick", action="store_true", help="tiny step counts (tests); numbers are meaningless")
    ap.add_argument("--eval-per-task", type=int, default=16)
    a = ap.parse_args(argv)
    models = demo.models_folder(None, a.quick)
    settings = D.WorldSettings(**demo.QUICK_WORLD) if a.quick else D.WorldSettings()
    extra = demo.QUICK_TRAIN if a.quick else []
    steps, per_task = (2, 2) if a.quick else (8, a.eval_per_task)
    tasks = list(D.DEMO_TASKS)
    timer = demo.Timer()
    base_dir, _ = demo.ensure_world(settings, models, False, timer, show=False)
    world = D.World(base_dir, "cpu")
    val = D.make_split(world, "val", per_task * len(tasks), tasks, 0, settings.resolution)
    rows = {}
    for seed in (int(s) for s in a.seeds.split(",")):
        for dtype in ("bf16", a.weight_dtype):
            runs = demo.train_methods(base_dir, models, seed, False, timer, extra + [f"--base.weight_dtype={dtype}"],
                                      "cpu", parallel=False, methods=("hywu",))
            method = D.load_methods(world, {"hywu": runs["hywu"] / "hywu_demo.safetensors"}, tasks)["hywu"]
            pred = D.predict(world, val, method, steps, 1.0, seed)
            rows.setdefault(dtype, {})[seed] = D.summarise(pred, val, tasks)["overall"]["psnr"]
            print(f"seed {seed} {dtype}: val PSNR {rows[dtype][seed]:.3f} dB", flush=True)
    seeds = sorted(rows["bf16"])
    diff = [rows[a.weight_dtype][s] - rows["bf16"][s] for s in seeds]
    out = {"weight_dtype": a.weight_dtype, "seeds": seeds, "val_psnr": rows,
           "mean": {k: float(np.mean(list(v.values()))) for k, v in rows.items()},
           "std": {k: float(np.std(list(v.values()), ddof=1)) if len(v) > 1 else 0.0 for k, v in rows.items()},
           "fp8_minus_bf16": diff, "fp8_minus_bf16_mean": float(np.mean(diff)),
           "fp8_minus_bf16_std": float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0,
           "goal": "mean difference within 0.3 dB", "timings_s": timer.stages}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
