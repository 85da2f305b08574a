#!/usr/bin/env python
"""The HY-WU claim on the synthetic edit world, over several seeds: on conflicting edits one shared
LoRA compromises, LoRAs generated per request do not.

On the frozen demo base of `make demo` (models/demo/base, built when missing), for each seed it
trains the three methods with `python -m trainer.train` (trainer/configs/demo.yaml, one budget:
same data, steps, batch, noise, timesteps, rank and layers; the seed changes the data order,
the noise and every initialisation) and scores them on the val and held-out-phrasing splits
(PSNR to the exact targets: per task, on the conflicting tasks, on the others, overall) with
eta^2 (does the LoRA depend on the task?). Prints one JSON document: per seed, and mean / std /
min / max over the seeds of each figure, with the acceptance checks of issue 8 computed.

    python bench/conflict.py                          # 3 seeds
    python bench/conflict.py --seeds 5 --train=--max-steps=600
    python bench/conflict.py --methods shared_lora,hywu --train=--generator.film=false   # an ablation
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hywu_demo as demo  # noqa: E402
import hywu_demo_core as D  # noqa: E402


def stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def seed_figures(metrics: dict, separation: dict) -> dict:
    """The figures issue 8 accepts on, for one seed."""
    out = {}
    for split in D.SPLITS:
        m = metrics[split]
        for method in ("shared_lora", "per_task_lora", "hywu"):
            if method in m:
                for group in ("conflicting", "non_conflicting", "overall"):
                    out[f"{split}/{method}/{group}"] = m[method][group]["psnr"]
        for ref in ("base", "identity", "vae_ceiling"):
            out[f"{split}/{ref}/overall"] = m[ref]["overall"]["psnr"]
        if {"shared_lora", "hywu"} <= m.keys():
            gain = m["hywu"]["conflicting"]["psnr"] - m["shared_lora"]["conflicting"]["psnr"]
            out[f"{split}/hywu_minus_shared/conflicting"] = gain
            out[f"{split}/hywu_minus_shared/non_conflicting"] = (m["hywu"]["non_conflicting"]["psnr"]
                                                                 - m["shared_lora"]["non_conflicting"]["psnr"])
            if "per_task_lora" in m:
                gap = m["per_task_lora"]["conflicting"]["psnr"] - m["shared_lora"]["conflicting"]["psnr"]
                out[f"{split}/oracle_minus_shared/conflicting"] = gap
                out[f"{split}/gap_closed"] = gain / gap if gap > 0 else float("nan")
    for method, sep in separation.items():
        out[f"val/{method}/eta2"] = sep["eta2"]
    return out


def acceptance(per_seed: list[dict]) -> dict:
    """Issue 8's targets, each true only if it holds in every seed."""
    def every(key, ok):
        vals = [s[key] for s in per_seed if key in s]
        return bool(vals) and all(ok(v) for v in vals)

    checks = {}
    for split in D.SPLITS:
        checks[f"{split}: HY-WU beats the shared LoRA by >= 1.0 dB on conflicting tasks"] = every(
            f"{split}/hywu_minus_shared/conflicting", lambda v: v >= 1.0)
        checks[f"{split}: HY-WU closes >= 60% of the shared -> oracle gap"] = every(f"{split}/gap_closed", lambda v: v >= 0.6)
        checks[f"{split}: HY-WU within 0.2 dB of the shared LoRA on non-conflicting tasks"] = every(
            f"{split}/hywu_minus_shared/non_conflicting", lambda v: v >= -0.2)
        checks[f"{split}: oracle beats the shared LoRA by >= 1.5 dB on conflicting tasks"] = every(
            f"{split}/oracle_minus_shared/conflicting", lambda v: v >= 1.5)
    checks["val: HY-WU task separation eta^2 >= 0.8"] = every("val/hywu/eta2", lambda v: v >= 0.8)
    return checks


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--methods", default="shared_lora,per_task_lora,hywu")
    ap.add_argument("--eval-per-task", type=int, default=32)
    ap.add_argument("--sample-steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--train", action="append", default=[], metavar="--SECTION.KEY=VALUE",
                    help="extra override for every trainer run")
    ap.add_argument("--models", default=str(REPO / "models"))
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--sequential", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.time()
    models = Path(a.models)
    methods = [m for m in a.methods.split(",") if m]
    settings = D.WorldSettings()
    timer = demo.Timer()
    base_dir, _ = demo.ensure_world(settings, models, False, timer, show=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = D.World(base_dir, device)
    tasks = list(D.DEMO_TASKS)
    splits = {s: D.make_split(world, s, a.eval_per_task * len(tasks), tasks, 0, settings.resolution) for s in D.SPLITS}
    per_seed, runs_info = [], []
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        runs = demo.train_methods(base_dir, models, seed, False, timer, list(a.train), device, parallel=not a.sequential,
                                  methods=methods)
        files = demo.run_files(runs, tasks)
        loaded = D.load_methods(world, {m: files[m] for m in methods}, tasks)
        metrics, _ = D.evaluate(world, splits, loaded, tasks, a.sample_steps, a.cfg, seed, show=False)
        separation = {m: D.task_separation(splits["val"], loaded[m]) for m in methods if m != "shared_lora"}
        per_seed.append(seed_figures(metrics, separation))
        runs_info.append({"seed": seed, "runs": {m: str(runs[m]) for m in methods}})
        print(json.dumps({"seed": seed, **{k: round(v, 3) for k, v in per_seed[-1].items()}}), file=sys.stderr, flush=True)
    keys = sorted({k for s in per_seed for k in s})
    result = {
        "benchmark": "conflict", "seeds": [r["seed"] for r in runs_info], "methods": methods, "tasks": tasks,
        "eval_images_per_task": a.eval_per_task, "sampler": {"steps": a.sample_steps, "cfg": a.cfg},
        "trainer_overrides": a.train, "world": settings.key(),
        "summary": {k: stats([s[k] for s in per_seed if k in s]) for k in keys},
        "acceptance": acceptance(per_seed), "per_seed": per_seed, "runs": runs_info,
        "seconds": round(time.time() - t0, 1), "timings_s": timer.stages,
    }
    text = json.dumps(result, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
