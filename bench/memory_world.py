"""Shared parts of bench/extend.py and bench/compose.py (issue 17, functional memory): the demo world
(scripts/hywu_demo_core.py), trainer runs through scripts/hywu_demo.py's cached runner, and PSNR summaries.
Not a benchmark itself."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hywu_demo as demo  # noqa: E402
import hywu_demo_core as D  # noqa: E402

# --quick: the demo's own quick sizes (a world that edits nothing; it shows the bench runs)
QUICK_TRAIN = ["--train.batch_size=4", "--generator.norm_examples=16", "--train.save_every=0", "--data.n_val=1"]


def add_world_args(ap) -> None:
    """The options every miniature-world bench takes (seeds, sizes, trainer overrides, where models live)."""
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--eval-per-task", type=int, default=32)
    ap.add_argument("--sample-steps", type=int, default=8)
    ap.add_argument("--train", action="append", default=[], metavar="--SECTION.KEY=VALUE", help="extra trainer override")
    ap.add_argument("--models", default=None, help="models folder (default models/; with --quick models/quick/)")
    ap.add_argument("--micro", default=None, help="an existing seeded micro base folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--force", action="store_true", help="retrain every run")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests): shows the bench runs, figures meaningless")
    ap.add_argument("--out", default=None)


def stats(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def settings(quick: bool, sets=()) -> D.WorldSettings:
    return (D.WorldSettings(**demo.QUICK_WORLD) if quick else D.WorldSettings()).with_overrides(sets)


def models_dir(a) -> Path:
    """--models, else models/ (models/quick/ with --quick: a quick run never replaces a full one's files)."""
    return demo.models_folder(a.models, a.quick)


def ensure_base(s: D.WorldSettings, models: Path, micro: str | None, show: bool = False) -> Path:
    """The frozen demo base of settings ``s`` (built when missing or stale, in its own folder:
    D.base_dir_for); no ComfyUI export: the benches do not need it."""
    import build_micro_base as bmb

    micro_dir = Path(micro) if micro else models / "micro_sd15_ip2p"
    if not micro:
        bmb.ensure_micro_base(micro_dir, models / "checkpoints" / "hywu_micro_sd15_ip2p.safetensors",
                              comfyui_path=bmb.find_comfyui(None))
    base_dir = D.base_dir_for(models, s)
    if not D.world_is_current(base_dir, s):
        D.log(f"building the demo base in {base_dir} (VAE, text encoder, IP2P UNet)")
        D.build_world(micro_dir, base_dir, s, show=show)
    return base_dir


def tasks_arg(tasks) -> str:
    return "--data.tasks=[" + ",".join(tasks) + "]"


def train(base_dir: Path, models: Path, seed: int, methods, extra, device: str, timer, force: bool = False,
          inprocess: bool = False) -> dict:
    """``python -m trainer.train`` (trainer/configs/demo.yaml + ``extra``) per method, cached by
    scripts/hywu_demo.py's runner (base, config, method, seed and overrides name a run).
    ``inprocess`` (--quick): the same command line through trainer.train.main in this process,
    uncached (a trainer process's start costs more than a quick run)."""
    if not inprocess:
        return demo.train_methods(base_dir, models, seed, force, timer, list(extra), device, methods=list(methods))
    import hashlib

    from trainer.train import main

    tag = hashlib.sha256(json.dumps(list(extra)).encode()).hexdigest()[:6] if extra else "default"
    out = {}
    for m in methods:
        out[m] = models / "demo" / "runs" / f"{m}-seed{seed}-{tag}"
        cmd = ["--config", str(demo.CONFIG), "--method", m, "--seed", str(seed), "--output", str(out[m]),
               f"--base.path={base_dir}", f"--data.cache_dir={models / 'demo' / 'encoded'}", f"--device={device}", *extra]
        if main(cmd) != 0:
            raise RuntimeError(f"python -m trainer.train {' '.join(cmd)} failed")
    return out


def run_file(run: Path, method: str, task: str | None = None) -> Path:
    if method == "per_task_lora":
        return run / f"hywu_demo-{task}.safetensors"
    return run / "hywu_demo.safetensors"


def group_psnr(metrics: dict, tasks) -> float:
    """Mean PSNR over ``tasks`` (equal images per task) from a D.summarise result."""
    return float(np.mean([metrics["per_task"][t]["psnr"] for t in tasks]))


def _finite(x):
    """NaN / inf -> None: the output is strict JSON."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def write(result: dict, out: str | None) -> None:
    text = json.dumps(_finite(result), indent=1, allow_nan=False)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)


def device_of(arg: str) -> str:
    return "cuda" if arg == "auto" and torch.cuda.is_available() else ("cpu" if arg == "auto" else arg)


class Clock:
    def __init__(self):
        self.t0 = time.time()

    def seconds(self) -> float:
        return round(time.time() - self.t0, 1)


def train_jobs(base_dir: Path, models: Path, seed: int, jobs: list, device: str, timer, force: bool = False,
               workers: int | None = None, inprocess: bool = False) -> list[dict]:
    """Several :func:`train` calls, ``jobs`` = [(methods, extra), ...]; on a CPU two at a time
    (one thread each: these small models use two cores better as two processes)."""
    return dict(train_seeds(base_dir, models, [seed], jobs, device, timer, force, workers, inprocess))[seed]


def train_seeds(base_dir: Path, models: Path, seeds, jobs: list, device: str, timer, force: bool = False,
                workers: int | None = None, inprocess: bool = False):
    """:func:`train_jobs` for every seed in one pool, seed by seed in ``jobs`` order. Yields
    (seed, runs) as soon as a seed's runs are done while the pool goes on with the next seeds',
    so the caller evaluates a seed beside the rest of the training and no core waits."""
    from concurrent.futures import ThreadPoolExecutor

    if inprocess:
        for s in seeds:
            yield s, [train(base_dir, models, s, m, e, device, timer, force, inprocess=True) for m, e in jobs]
        return
    pool = ThreadPoolExecutor(max_workers=workers or (2 if device == "cpu" else 1))
    try:
        futures = {s: [pool.submit(train, base_dir, models, s, m, e, device, timer, force) for m, e in jobs] for s in seeds}
        for s, fs in futures.items():
            yield s, [f.result() for f in fs]
    finally:  # a failed run or evaluation: the queued runs are not started
        pool.shutdown(wait=True, cancel_futures=True)
