#!/usr/bin/env python
"""Benchmark of the HY-WU claim on the synthetic edit world: on conflicting edit tasks one
shared LoRA compromises, per-instance generated LoRAs do not.

For each seed, on the same frozen demo base (scripts/demo.py pretrains it; reused from
models/demo/base when its settings match, else built under models/bench/), it trains with one
and the same budget (steps, batch, data stream, LoRA rank and layers):
  shared_lora    one LoRA for every request
  per_task_lora  one LoRA per task (oracle: told the task label)
  hywu           the generator writes a LoRA per request from instruction + source image
then measures PSNR / SSIM to the exact targets on the val and held-out-phrasing splits (per
task, on the conflicting tasks, overall) and the shared LoRA's gradient cosine between tasks
(at initialisation and after training). Prints one JSON document: mean, std, min, max over
seeds per method and split, and the gradient-cosine statistics.

    python bench/conflict.py                       # 3 seeds, 2x the demo's steps
    python bench/conflict.py --seeds 5 --steps 1000 --set rank=16 --set generator_preset=small
    python bench/conflict.py --tasks brighten,darken,blur,sharpen --set resolution=64
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import demo_core as D  # noqa: E402


def stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def parse_set(settings: D.DemoSettings, items: list[str]) -> D.DemoSettings:
    for kv in items:
        k, _, v = kv.partition("=")
        cur = getattr(settings, k)
        settings = replace(settings, **{k: tuple(v.split(",")) if isinstance(cur, tuple) else type(cur)(v)})
    return settings


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="adapter steps (default: 2x the demo's)")
    ap.add_argument("--tasks", default=None, help="comma-separated synthetic tasks (default: the demo's)")
    ap.add_argument("--eval-per-task", type=int, default=16)
    ap.add_argument("--methods", default="shared_lora,per_task_lora,hywu", help="which adapters to train")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a DemoSettings field")
    ap.add_argument("--models", default=str(REPO / "models"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(REPO / "output" / "bench" / "conflict.json"))
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    show = not a.no_progress
    import demo  # noqa: F401  (thread choice for shared CPUs)

    torch.set_num_threads(demo._threads())

    s = D.DemoSettings(device=a.device)
    s = replace(s, steps=a.steps or 2 * s.steps, n_eval_per_task=a.eval_per_task)
    if a.tasks:
        s = replace(s, tasks=tuple(a.tasks.split(",")))
    s = parse_set(s, a.set)
    models = Path(a.models)
    t0 = time.time()

    base_dir = models / "demo" / "base"
    if not D.base_is_current(base_dir, s):
        base_dir = models / "bench" / f"base_{s.key(*D.DemoSettings.BASE_KEYS)}"
        if not D.base_is_current(base_dir, s):
            import build_micro_base as bmb

            micro, _ = bmb.ensure_micro_base(models / "micro_sd15_ip2p",
                                             models / "checkpoints" / "hywu_micro_sd15_ip2p.safetensors")
            D.log(f"pretraining a base for these settings into {base_dir}")
            D.pretrain_base(Path(micro), base_dir, s, show=show)
    world = D.load_world(base_dir, s)
    train = D.make_split("train", s.n_train, s)
    D.encode_split(world, train)
    splits = {k: D.encode_split(world, D.make_split(k, s.n_eval_per_task * len(s.tasks), s)) for k in D.SPLITS}

    methods = tuple(a.methods.split(","))
    per_seed = []
    base_metrics, _ = D.evaluate(world, splits, {"base": None}, s, show=False)
    for seed in range(a.seeds):
        D.log(f"\n== seed {seed}")
        adapters, losses = {}, {}
        for method in methods:
            adapters[method], ls = D.train_method(method, world, train, s, seed=seed, show=show)
            losses[method] = float(np.mean(ls[-20:]))
        metrics, _ = D.evaluate(world, splits, adapters, s, show=False)
        init = D.Adapter("shared_lora", world, s, seed=1000 + seed)
        with torch.no_grad():
            for b in init.static.b:
                b.normal_(0, 1e-3)
        gc = {"init": D.gradient_cosines(world, splits["val"], s, init, seed=seed)}
        if "shared_lora" in adapters:
            gc["trained"] = D.gradient_cosines(world, splits["val"], s, adapters["shared_lora"], seed=seed)
        sep = {m: D.task_separation(world, splits["val"], adapters[m]) for m in ("per_task_lora", "hywu") if m in adapters}
        per_seed.append({"seed": seed, "metrics": metrics, "gradient_cosine": gc, "final_loss": losses,
                         "lora_task_separation_val": sep})
        D.log("task separation (eta^2): " + ", ".join(f"{m} {v['eta2']:.2f}" for m, v in sep.items()))
        D.log(D.format_table({k: {**base_metrics[k], **metrics[k]} for k in metrics}, s))
        D.log(D.format_cosines(gc))

    summary = {}
    for split in D.SPLITS:
        summary[split] = {"base": {g: base_metrics[split]["base"][g] for g in ("overall", "conflicting")},
                          "vae_ceiling": {g: base_metrics[split]["vae_ceiling"][g] for g in ("overall", "conflicting")}}
        for m in methods:
            entry = {}
            for group in ("overall", "conflicting"):
                entry[group] = {k: stats([r["metrics"][split][m][group][k] for r in per_seed]) for k in ("psnr", "ssim")}
            entry["per_task_psnr"] = {t: stats([r["metrics"][split][m]["per_task"][t]["psnr"] for r in per_seed])
                                      for t in s.tasks}
            summary[split][m] = entry
        # paired differences (same seed): HY-WU minus each baseline, on the conflicting tasks
        if "hywu" in methods:
            summary[split]["hywu_minus"] = {
                b: stats([r["metrics"][split]["hywu"]["conflicting"]["psnr"] - r["metrics"][split][b]["conflicting"]["psnr"]
                          for r in per_seed]) for b in ("shared_lora", "per_task_lora") if b in methods}
    grad = {}
    for when in [w for w in ("init", "trained") if w in per_seed[0]["gradient_cosine"]]:
        grad[when] = {}
        for kind in ("raw", "centred"):
            blocks = [r["gradient_cosine"][when] if kind == "raw" else r["gradient_cosine"][when]["centred"]
                      for r in per_seed]
            pairs = {}
            for blk in blocks:
                for k, v in blk["conflicting_pairs"].items():
                    pairs.setdefault(k, []).append(v)
            grad[when][kind] = {
                "conflicting": stats([v for blk in blocks for v in blk["conflicting_pairs"].values()]),
                "other_pairs_mean": stats([blk["mean_other_pairs"] for blk in blocks]),
                "per_pair": {k: stats(v) for k, v in pairs.items()},
            }
    separation = {m: {k: stats([r["lora_task_separation_val"][m][k] for r in per_seed]) for k in ("eta2", "relative_spread")}
                  for m in per_seed[0]["lora_task_separation_val"]}
    result = {
        "claim": "HY-WU > shared LoRA on conflicting tasks; HY-WU >= per-task LoRA without the task label; "
                 "conflicting tasks have negative gradient cosine under a shared LoRA",
        "settings": asdict(s), "base": str(base_dir), "device": str(world.device), "seeds": a.seeds,
        "summary": summary, "gradient_cosine": grad, "lora_task_separation_eta2": separation, "per_seed": per_seed,
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=list))
    brief = {k: v for k, v in result.items() if k != "per_seed"}
    print(json.dumps(brief, indent=2, default=list))
    return result


if __name__ == "__main__":
    main()
