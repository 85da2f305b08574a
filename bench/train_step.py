"""Training-step cost of HY-WU generator training vs. the shared-LoRA baseline (same base, batches,
noise draws and targets), and of the trainer vs. a bare in-process loop, as JSON.

    python bench/train_step.py                          # sd15-bench: small SD1.5-shaped base, 64 px
    python bench/train_step.py --base sd15-full         # full-size SD1.5 UNet (seeded RANDOM weights), 256 px
    python bench/train_step.py --base demo              # the demo config: trainer step vs in-process step
    python bench/train_step.py --weight-dtype fp8_scaled # also the HY-WU step on the base stored in fp8

Bases:
  * ``sd15-bench``: trainer.tiny_bases "sd15_bench" (two-level UNet, 8 transformer blocks), 64 px,
    tiny preset, rank 8, batch 4;
  * ``sd15-full``: the full SD1.5-InstructPix2Pix UNet + CLIP-L + SD VAE built from
    trainer/architectures with seeded random weights (``base.synthetic_full``), 256 px, the
    "small" preset, rank 16, the full default target set (160 layers), batch 1 with 4 noise /
    timestep draws per example (``train.draws_per_example``: the generated LoRA is made once per
    example and serves all its draws; the shared LoRA gets exactly the same 4 samples);
  * ``demo``: trainer/configs/demo.yaml on the demo base (models/demo/base when ``make demo``
    built it, else the seeded micro base of the same architecture).

Each measurement runs in its own process, so peak memory is per method: CUDA
max_memory_allocated, or on CPU the peak RSS of the process (it includes the frozen base). On
CPU every step is timed in wall seconds and in CPU seconds of the process (steadier when other
jobs share the machine); ratios compare runs of the same invocation. ``components`` splits a
step: the base's forward+backward per sample with a shared vs. per-sample LoRA, and the
generator's own forward+backward per example, from which the step ratio at other draw counts
follows. ``trainer_vs_inprocess`` (``--base demo``, or ``--inprocess``) compares the trainer's
HY-WU step (pre-encoded rows) with a bare loop on tensors encoded once up front (what
the demo's former in-process loop did) on the same base, generator and batch, alternating the two in
one process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BASES = {
    "sd15-bench": dict(resolution=64, preset="tiny", rank=8, alpha=8.0, batch=4, draws=1, n_train=64),
    "sd15-full": dict(resolution=256, preset="small", rank=16, alpha=16.0, batch=1, draws=4, n_train=2),
    "demo": dict(),  # from trainer/configs/demo.yaml
}


def _demo_base() -> str:
    built = REPO / "models" / "demo" / "base"
    if (built / "unet").is_dir():
        return str(built)
    sys.path.insert(0, str(REPO / "scripts"))
    import build_micro_base as bmb  # the seeded micro base the demo pretrains (same architecture)

    return str(bmb.ensure_micro_base()[0])


def make_config(args, method: str):
    """The TrainConfig a child process trains (same data, batches and draws for every method)."""
    from trainer.config import TrainConfig, load_config, validate
    from trainer.tiny_bases import CACHE, build_tiny_base

    b = BASES[args.base]
    if args.base == "demo":
        cfg = load_config(str(REPO / "trainer" / "configs" / "demo.yaml"))
        cfg.base.path, cfg.base.tiny = _demo_base(), False
    else:
        cfg = TrainConfig()
        cfg.base.family, cfg.base.resolution = "sd15_ip2p", b["resolution"]
        if args.base == "sd15-full":
            cfg.base.synthetic_full, cfg.base.path = True, ""
        else:
            cfg.base.path = str(build_tiny_base("sd15_bench", CACHE / "sd15_bench"))
        cfg.data.n_train = b["n_train"]
        cfg.generator.preset, cfg.generator.rank, cfg.generator.alpha = args.preset or b["preset"], b["rank"], b["alpha"]
        cfg.train.batch_size = args.batch or b["batch"]
        cfg.train.draws_per_example = args.draws or b["draws"]
    cfg.name, cfg.output = f"bench_{method}", str(Path(args.output) / args.base / method)
    if method == "hywu_fp8":  # the same HY-WU step on the base stored in fp8 (base.weight_dtype)
        method, cfg.base.weight_dtype = "hywu", args.weight_dtype
    cfg.data.n_val = 0  # no validation sampling in a timing run
    cfg.data.cache_dir = str(Path(args.output) / "encoded")  # every child after the first loads the encodings
    t = cfg.train
    t.method, t.max_steps, t.device, t.mixed_precision = method, args.warmup + args.steps, args.device, args.precision
    t.save_every, t.validate_every, t.log_every = 0, 0, 1
    cfg.generator.gradient_checkpointing = args.generator_checkpointing
    validate(cfg)
    return cfg


def _threads(args):
    import torch

    if args.device == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)


def child(args) -> dict:
    from trainer.train import run

    _threads(args)
    cfg = make_config(args, args._child)
    s = run(cfg, progress=False)
    times, cpu = s["step_times"][args.warmup:], s["step_cpu_times"][args.warmup:]
    return {"method": args._child, "median_step_s": statistics.median(times), "median_step_cpu_s": statistics.median(cpu),
            "peak_memory_mb": s["peak_memory_mb"], "device": s["device"],
            "trainable_parameters": s["sizes"].get("generator_parameters") or s["sizes"].get("lora_parameters"),
            "targets": s["sizes"]["targets"], "sizes": s["sizes"], "batch": cfg.train.batch_size,
            "draws_per_example": cfg.train.draws_per_example, "encoded_rows": s["encoded_rows"]}


def _clock(dev):
    import torch

    def now():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    return now


def components(args) -> dict:
    """Where the HY-WU step goes: base fwd+bwd per sample with a shared vs. per-sample LoRA (the
    core's functional path), and the generator's own fwd+bwd per example."""
    import torch

    from hywu_nodes.core import GeneratedLoRA, build_target_spec, lora_patched
    from trainer.data import collate, synthetic_dataset
    from trainer.families import load_family
    from trainer.methods import build_method

    _threads(args)
    cfg = make_config(args, "hywu")
    dev = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    a = load_family(cfg, dev, dtype)
    n = cfg.train.batch_size * cfg.train.draws_per_example
    r = cfg.base.resolution
    ds = synthetic_dataset("train", n, 0, r)
    prep = a.prepare(collate([ds.load(i, r) for i in range(n)]), 0, list(range(n)))
    spec = build_target_spec(a.denoiser, "sd15_ip2p", include=cfg.base.targets)
    torch.manual_seed(0)
    gen = build_method(cfg, spec, a.condition_spec, []).module.to(dev)
    rank = cfg.generator.rank
    cond = prep["condition"].select(list(range(cfg.train.batch_size))).to(dev)
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)

    def lora(k):
        return GeneratedLoRA({t.name: (torch.randn(k, rank, t.d_in, device=dev, requires_grad=True),
                                       torch.randn(k, t.d_out, rank, device=dev, requires_grad=True)) for t in spec.targets}, 1.0)

    def base(k):
        with autocast, lora_patched(a.denoiser, lora(k)):
            a.loss(prep).mean().backward()

    def generator():
        with autocast:
            gen.tokens(cond).float().square().mean().backward()

    now = _clock(dev)

    def timed(f):
        f()  # warm-up
        w0, c0 = now()
        for _ in range(args.steps):
            f()
        w1, c1 = now()
        return (w1 - w0) / args.steps, (c1 - c0) / args.steps

    shared, per_sample, g = timed(lambda: base(1)), timed(lambda: base(n)), timed(generator)
    per_example = cfg.train.batch_size
    out = {"base_samples": n, "examples": per_example,
           "base_fwd_bwd_shared_lora_s": shared[0], "base_fwd_bwd_per_sample_lora_s": per_sample[0],
           "generator_fwd_bwd_s": g[0],
           "base_fwd_bwd_shared_lora_cpu_s": shared[1], "base_fwd_bwd_per_sample_lora_cpu_s": per_sample[1],
           "generator_fwd_bwd_cpu_s": g[1], "per_sample_path_ratio": per_sample[0] / shared[0]}
    # Step ratio (HY-WU / shared LoRA) at other draw counts, from these parts (CPU seconds when on CPU).
    k = 0 if dev.type == "cuda" else 1  # wall time on a GPU, CPU seconds on a (shared) CPU
    base_per_sample = (shared[k] / n)
    gen_per_example = g[k] / per_example
    out["predicted_step_ratio_by_draws"] = {str(d): 1 + gen_per_example / (d * base_per_sample) for d in (1, 2, 3, 4, 8)}
    return out


def inprocess(args) -> dict:
    """The trainer's HY-WU step and a bare loop on tensors encoded once up front (no data path;
    the trainer's base, generator config and batch), alternated in one process, ``--repeats``
    rounds of ``--steps`` each, so both see the same machine load."""
    from trainer.train import run

    _threads(args)
    trainer, bare = [], []
    for _ in range(args.repeats):
        s = run(make_config(args, "hywu"), progress=False)
        trainer += list(zip(s["step_times"], s["step_cpu_times"]))[args.warmup:]
        bare += _bare_loop(args)
    med = {f"{name}_{unit}": statistics.median(x[i] for x in rows)
           for name, rows in (("trainer", trainer), ("inprocess", bare)) for i, unit in enumerate(("step_s", "step_cpu_s"))}
    return {**med, "ratio": med["trainer_step_s"] / med["inprocess_step_s"],
            "cpu_ratio": med["trainer_step_cpu_s"] / med["inprocess_step_cpu_s"], "steps_each": len(trainer)}


_BARE: dict = {}  # encoded once per process, as the demo's former in-process loop encoded each split


def _bare_loop(args) -> list[tuple[float, float]]:
    import torch
    import torch.nn.functional as F

    from hywu_nodes.core import Condition, lora_patched, patchify_latent

    if not _BARE:
        _BARE.update(_bare_setup(args))
    a, src, tgt, text, gen, opt, b, max_norm = (_BARE[k] for k in ("adapter", "src", "tgt", "text", "gen", "opt", "b", "max_norm"))
    gen_text, mask = _BARE["gen_text"], _BARE["mask"]
    dev = a.device
    ac = a.alphas_cumprod
    g = torch.Generator().manual_seed(len(_BARE.setdefault("rounds", [])))
    _BARE["rounds"].append(1)
    now = _clock(dev)
    times = []
    for _ in range(args.warmup + args.steps):
        w0, c0 = now()
        idx = torch.randint(len(src), (b,), generator=g)
        t = torch.randint(0, 1000, (b,), generator=g).to(dev)
        noise = torch.randn(tgt[idx].shape, generator=g).to(dev)
        acb = ac[t].view(-1, 1, 1, 1)
        z = acb.sqrt() * tgt[idx] + (1 - acb).sqrt() * noise
        lora = gen(Condition({"text": gen_text[idx], "image": patchify_latent(src[idx], 2)},
                             {} if mask is None else {"text": mask[idx]}))
        with lora_patched(a.denoiser, lora):
            pred = a.unet(torch.cat([z, src[idx] / 0.18215], 1), t, encoder_hidden_states=text[idx]).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), max_norm)
        opt.step()
        w1, c1 = now()
        times.append((w1 - w0, c1 - c0))
    return times[args.warmup:]


def _bare_setup(args) -> dict:
    import torch

    from hywu_nodes.core import build_target_spec
    from trainer.data import build_datasets, collate
    from trainer.families import load_family
    from trainer.methods import build_method

    cfg = make_config(args, "hywu")
    dev = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    a = load_family(cfg, dev, torch.float32)
    train, _ = build_datasets(cfg)
    r, b = cfg.base.resolution, cfg.train.batch_size
    rows = [train.load(i, r) for i in range(len(train))]
    with torch.no_grad():
        src = torch.cat([a.latent(collate(rows[i:i + 64])["source"]) for i in range(0, len(rows), 64)])
        tgt = torch.cat([a.latent(collate(rows[i:i + 64])["target"]) for i in range(0, len(rows), 64)])
        # (UNet context, [generator text,] prompt mask) per instruction, as the trainer keeps them (sd15)
        parts = [a.training_text([x["instruction"] for x in rows[i:i + 64]]) for i in range(0, len(rows), 64)]
        text, *gen_text, mask = (torch.cat(col) for col in zip(*parts))
    gen_text = gen_text[0] if gen_text else text
    masks = mask if a.condition_spec["text"].padding_mask else None
    torch.manual_seed(cfg.train.seed)
    spec = build_target_spec(a.denoiser, cfg.base.family, include=cfg.base.targets)
    gen = build_method(cfg, spec, a.condition_spec, []).module.to(dev).train()
    return {"adapter": a, "src": src, "tgt": tgt, "text": text, "gen_text": gen_text, "mask": masks, "gen": gen, "b": b,
            "max_norm": cfg.train.max_grad_norm,
            "opt": torch.optim.AdamW(gen.parameters(), lr=cfg.train.lr)}


def _spawn(kind: str, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, __file__, "--_child", kind, *argv], env=env, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{kind} run failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="sd15-bench", choices=sorted(BASES))
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default 10; 2 for sd15-full)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 for sd15-full)")
    p.add_argument("--batch", type=int, default=None, help="examples per step (default per base)")
    p.add_argument("--draws", type=int, default=None, help="noise/timestep draws per example (default per base)")
    p.add_argument("--preset", default=None, help="generator preset (default per base)")
    p.add_argument("--generator-checkpointing", action="store_true", help="generator activation checkpointing")
    p.add_argument("--inprocess", action="store_true", help="also time the bare in-process loop (always for --base demo)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds of trainer / in-process steps")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: 1 on CPU, default on CUDA)")
    p.add_argument("--output", default=str(REPO / "output" / "bench_train_step"))
    p.add_argument("--weight-dtype", default=None, choices=("fp8_e4m3fn", "fp8_scaled"),
                   help="also time the HY-WU step on the base stored in this fp8 format (base.weight_dtype)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    full = args.base == "sd15-full"
    args.steps = args.steps if args.steps is not None else (2 if full else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if full else 2)
    if args._child:
        fn = {"components": components, "inprocess": inprocess}.get(args._child, child)
        print("RESULT " + json.dumps(fn(args)))
        return
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    t0 = time.perf_counter()
    kinds = ("hywu", "shared_lora", "components") + (("hywu_fp8",) if args.weight_dtype else ())
    results = {kind: _spawn(kind, forwarded) for kind in kinds}
    h, s = results["hywu"], results["shared_lora"]
    report = {
        "base": args.base, "random_weights": full, "batch": h["batch"], "draws_per_example": h["draws_per_example"],
        "preset": args.preset or BASES[args.base].get("preset") or "demo.yaml", "device": h["device"],
        "precision": args.precision, "steps": args.steps, "warmup": args.warmup,
        "threads": args.threads or (1 if h["device"] == "cpu" else None),
        "hywu": h, "shared_lora": s,
        "step_time_ratio": h["median_step_s"] / s["median_step_s"],
        "step_cpu_time_ratio": h["median_step_cpu_s"] / s["median_step_cpu_s"],
        "peak_memory_ratio": h["peak_memory_mb"] / s["peak_memory_mb"],
        "components": results["components"],
    }
    if args.weight_dtype:
        f = results["hywu_fp8"]
        report["hywu_fp8"] = {**f, "weight_dtype": args.weight_dtype,
                              "step_time_vs_bf16": f["median_step_s"] / h["median_step_s"],
                              "step_cpu_time_vs_bf16": f["median_step_cpu_s"] / h["median_step_cpu_s"],
                              "peak_memory_vs_bf16": f["peak_memory_mb"] / h["peak_memory_mb"]}
    if args.base == "demo" or args.inprocess:
        report["trainer_vs_inprocess"] = _spawn("inprocess", forwarded)
    report["bench_seconds"] = time.perf_counter() - t0
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
