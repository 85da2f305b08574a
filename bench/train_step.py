"""Training-step cost of HY-WU generator training vs. the shared-LoRA baseline (same base, batch,
targets): median step time and peak memory, and their ratios, as JSON.

    python bench/train_step.py                  # CUDA when present, else CPU
    python bench/train_step.py --device cpu --steps 8 --batch 4

The base is SD1.5-shaped but small (trainer.tiny_bases "sd15_bench": a two-level UNet with 8-channel
IP2P input, 8 transformer blocks, default attention + FFN targets), 64x64 images. Each method
runs in its own process, so peak memory is per method: CUDA max_memory_allocated, or on CPU the
peak RSS of the process (includes the frozen base: read CPU memory ratios with that in mind).
"components" splits the HY-WU step: the base forward+backward with one shared LoRA vs. with
per-sample LoRAs (the core's functional path; ``per_sample_path_ratio``), and the generator's own
forward+backward (the part a static LoRA does not have).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def child(args) -> dict:
    import torch

    from trainer.config import TrainConfig, validate
    from trainer.tiny_bases import CACHE, build_tiny_base
    from trainer.train import run

    if args.device == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    cfg = TrainConfig()
    cfg.name, cfg.output = f"bench_{args._child}", str(Path(args.output) / args._child)
    cfg.base.family, cfg.base.path, cfg.base.resolution = "sd15_ip2p", str(build_tiny_base("sd15_bench", CACHE / "sd15_bench")), 64
    cfg.data.n_train, cfg.data.n_val = 64, 1
    cfg.generator.preset, cfg.generator.rank, cfg.generator.alpha = args.preset, 8, 8.0
    t = cfg.train
    t.method, t.max_steps, t.batch_size, t.device, t.validate_steps = args._child, args.warmup + args.steps, args.batch, args.device, 1
    t.mixed_precision = args.precision
    validate(cfg)
    s = run(cfg, progress=False)
    times = s["step_times"][args.warmup:]
    return {"method": args._child, "median_step_s": statistics.median(times), "peak_memory_mb": s["peak_memory_mb"],
            "device": s["device"], "trainable_parameters": s["sizes"].get("generator_parameters") or s["sizes"].get("lora_parameters"),
            "targets": s["sizes"]["targets"]}


def components(args) -> dict:
    """Where the HY-WU step goes: base fwd+bwd with a shared LoRA vs. with per-sample LoRAs
    (the core's functional path), and the generator's own fwd+bwd."""
    import time

    import torch

    from hywu_nodes.core import GeneratedLoRA, GeneratorConfig, HYWUGenerator, build_target_spec, lora_patched
    from trainer.config import TrainConfig
    from trainer.data import collate, synthetic_dataset
    from trainer.families import load_family
    from trainer.tiny_bases import CACHE, build_tiny_base

    torch.set_num_threads(args.threads or 1) if args.device == "cpu" or args.threads else None
    dev = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg = TrainConfig()
    cfg.base.path, cfg.base.resolution = str(build_tiny_base("sd15_bench", CACHE / "sd15_bench")), 64
    a = load_family(cfg, dev, torch.float32)
    ds = synthetic_dataset("train", args.batch, 0, 64)
    prep = a.prepare(collate([ds.load(i, 64) for i in range(args.batch)]), 0, list(range(args.batch)))
    spec = build_target_spec(a.denoiser, "sd15_ip2p")
    gen = HYWUGenerator(GeneratorConfig.from_preset(args.preset, rank=8, alpha=8.0), spec, a.condition_spec).to(dev)

    def lora(n):
        return GeneratedLoRA({t.name: (torch.randn(n, 8, t.d_in, device=dev, requires_grad=True),
                                       torch.randn(n, t.d_out, 8, device=dev, requires_grad=True)) for t in spec.targets}, 1.0)

    def base(n):
        with lora_patched(a.denoiser, lora(n)):
            a.loss(prep).mean().backward()

    def generator():
        gen.tokens(prep["condition"].to(dev)).float().square().mean().backward()

    def timed(f):
        f()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            f()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps

    shared, per_sample, g = timed(lambda: base(1)), timed(lambda: base(args.batch)), timed(generator)
    return {"base_fwd_bwd_shared_lora_s": shared, "base_fwd_bwd_per_sample_lora_s": per_sample,
            "per_sample_path_ratio": per_sample / shared, "generator_fwd_bwd_s": g}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--preset", default="tiny", help="generator preset")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: 1 on CPU, default on CUDA)")
    p.add_argument("--output", default=str(REPO / "output" / "bench_train_step"))
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print("RESULT " + json.dumps(components(args) if args._child == "components" else child(args)))
        return
    results = {}
    for method in ("hywu", "shared_lora", "components"):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, __file__, "--_child", method] + [a for a in (argv or sys.argv[1:])]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{method} run failed:\n{out.stderr[-3000:]}")
        results[method] = json.loads(line[-1][len("RESULT "):])
    h, s = results["hywu"], results["shared_lora"]
    print(json.dumps({
        "base": "sd15_bench (SD1.5-shaped tiny UNet, 64x64, default targets)", "batch": args.batch, "preset": args.preset,
        "device": h["device"], "precision": args.precision, "steps": args.steps,
        "hywu": h, "shared_lora": s,
        "step_time_ratio": h["median_step_s"] / s["median_step_s"],
        "peak_memory_ratio": h["peak_memory_mb"] / s["peak_memory_mb"],
        "components": results["components"],
    }, indent=1))


if __name__ == "__main__":
    main()
