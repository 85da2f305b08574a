#!/usr/bin/env python
"""`make demo`: the whole HY-WU product in a miniature world, on a CPU, with no downloads.

1. builds (or reuses) the seeded micro SD1.5-InstructPix2Pix base (scripts/build_micro_base.py)
   and makes it a small editor of the synthetic world (scripts/hywu_demo_core.build_world) ->
   models/demo/base/ (diffusers) + models/checkpoints/hywu_demo_sd15_ip2p.safetensors (ComfyUI);
2. trains, with `python -m trainer.train` (trainer/configs/demo.yaml) and one budget, a shared LoRA,
   per-task LoRAs (an oracle told the task) and the HY-WU generator on the conflicting edits the
   base never learned -> models/loras/hywu_demo_shared_lora.safetensors,
   models/loras/hywu_demo_<task>.safetensors, models/hywu/hywu_demo.safetensors;
3. scores every method's edits against the exact targets on the val and held-out-phrasing splits,
   how the base's text encoder groups instructions, the shared LoRA's gradient cosine per
   conflicting pair and how much each method's LoRA depends on the request;
4. runs the demo workflow (HY-WU) and a core LoraLoaderModelOnly graph (the shared LoRA file) in a
   headless ComfyUI on validation images and checks they make the in-process edits;
5. writes output/demo/ (grid.png, images/, metrics.json) and prints the table.

Every stage is cached under models/ (git-ignored): a second run reuses what is still valid.

    python scripts/hywu_demo.py [--quick] [--no-comfy] [--force] [--seed N] [--out output/demo] [--models models]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "tests")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads on shared cores: ~8x slower

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import hywu_demo_core as D  # noqa: E402
from trainer import synthetic  # noqa: E402

CONFIG = REPO / "trainer" / "configs" / "demo.yaml"
DEMO_CKPT_NAME = "hywu_demo_sd15_ip2p.safetensors"
DEMO_GENERATOR_NAME = "hywu_demo.safetensors"
SHARED_LORA_NAME = "hywu_demo_shared_lora.safetensors"
TASK_LORA_NAME = "hywu_demo_{task}.safetensors"
METHODS = ("shared_lora", "per_task_lora", "hywu")
# The conflicting pair the ComfyUI part edits with (both instructions on the same images).
COMFY_PAIR = ("brighten", "darken")

QUICK_WORLD = dict(vae_images=32, vae_steps=2, vae_batch=4, text_steps=2, base_n_train=40, base_steps=2, base_batch=4)
QUICK_TRAIN = ["--max-steps", "2", "--train.batch_size=4", "--data.n_train=40", "--generator.norm_examples=16",
               "--train.save_every=0"]


class Timer:
    """Stage timings: ``stages`` (name -> seconds, stages that ran) and ``rows`` (every stage, in
    order, with whether it came from the cache) for the closing table and metrics.json."""

    def __init__(self):
        self.t0 = time.time()
        self.stages: dict[str, float] = {}
        self.rows: list[dict] = []

    def cached(self, name: str, where) -> None:
        D.log(f"\n== {name}: reused {where} [{time.time() - self.t0:.0f}s elapsed]")
        self.rows.append({"stage": name, "seconds": 0.0, "cached": True})

    def stage(self, name: str, cached: bool = False):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t = time.time()
                D.log(f"\n== {name} [{self.t - timer.t0:.0f}s elapsed]")

            def __exit__(self, *exc):
                took = time.time() - self.t
                timer.stages[name] = round(timer.stages.get(name, 0.0) + took, 1)
                timer.rows.append({"stage": name, "seconds": round(took, 1), "cached": cached})
                D.log(f"   done: {name} in {took:.1f}s [{time.time() - timer.t0:.0f}s elapsed]")
        return _Stage()

    def table(self) -> str:
        w = max([len(r["stage"]) for r in self.rows] + [len("stage")])
        lines = [f"{'stage':<{w}}  {'seconds':>8}  cached"]
        lines += [f"{r['stage']:<{w}}  {r['seconds']:>8.1f}  {'yes' if r['cached'] else 'no'}" for r in self.rows]
        return "\n".join(lines + [f"{'total':<{w}}  {time.time() - self.t0:>8.1f}"])


def quiet_progress_bars() -> dict:
    """Not a terminal: switch off the libraries' bars in this process and return the environment
    for child processes (tqdm's TQDM_DISABLE default, huggingface_hub's flag; the trainer's own
    bars use tqdm's disable=None, off on a non-terminal)."""
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    return {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def comfy_path():
    import build_micro_base as bmb

    return bmb.find_comfyui(None)


def ensure_world(settings: D.WorldSettings, models: Path, force: bool, timer: Timer, show: bool,
                 micro: Path | None = None) -> tuple[Path, Path]:
    import build_micro_base as bmb

    comfy = comfy_path()
    micro_dir = Path(micro) if micro is not None else models / "micro_sd15_ip2p"
    if micro is not None:
        timer.cached("micro base (given with --micro)", micro_dir)
    if micro is None:
        had = (micro_dir / "model_index.json").is_file() and (models / "checkpoints" / "hywu_micro_sd15_ip2p.safetensors").is_file()
        with timer.stage("micro base (seeded, build or reuse)", cached=had):
            bmb.ensure_micro_base(micro_dir, models / "checkpoints" / "hywu_micro_sd15_ip2p.safetensors", comfyui_path=comfy)
    base_dir = D.base_dir_for(models, settings)
    ckpt = models / "checkpoints" / DEMO_CKPT_NAME
    if force or not D.world_is_current(base_dir, settings):
        with timer.stage("build the demo base (VAE, text encoder, IP2P UNet on the base tasks)"):
            info = D.build_world(micro_dir, base_dir, settings, show=show)
            D.log(f"   VAE ceiling {info['vae_ceiling_psnr_val']:.2f} dB, UNet loss {info['unet_final_loss']:.4f}, "
                  f"stages {info['seconds']}")
    else:
        timer.cached("build the demo base", base_dir)
    # the checkpoint is exported from this base (a run with other settings exported its own base)
    source = ckpt.with_name(ckpt.name + ".base")
    made_from = f"{base_dir.resolve()} {settings.key()}"
    if not ckpt.is_file() or not source.is_file() or source.read_text() != made_from \
            or ckpt.stat().st_mtime < (base_dir / "hywu_demo_base.json").stat().st_mtime:
        with timer.stage("export the ComfyUI checkpoint"):
            bmb.export_comfy_checkpoint(base_dir, ckpt, comfy)
            source.write_text(made_from)
    return base_dir, ckpt


def _run_key(base_dir: Path, method: str, seed: int, extra: list[str]) -> str:
    info = json.loads((base_dir / "hywu_demo_base.json").read_text())
    config = yaml.safe_load(CONFIG.read_text())  # the parsed config: editing a comment retrains nothing
    blob = json.dumps([info["settings_key"], config, method, seed, extra], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_methods(base_dir: Path, models: Path, seed: int, force: bool, timer: Timer, extra: list[str],
                  device: str = "auto", parallel: bool = True, methods=METHODS) -> dict[str, Path]:
    """`python -m trainer.train` for each method (cached by base, config, seed and overrides).
    On a CPU the generator trains next to the two static baselines, one thread each: these small
    models use two cores better as two processes than as one with two threads."""
    runs = models / "demo" / "runs"
    tag = hashlib.sha256(json.dumps(extra).encode()).hexdigest()[:6] if extra else "default"
    out = {m: runs / f"{m}-seed{seed}-{tag}" for m in methods}
    todo = []
    for m in methods:
        key = _run_key(base_dir, m, seed, extra)
        marker = out[m] / "demo_run.json"
        if not force and marker.is_file() and json.loads(marker.read_text()).get("key") == key:
            timer.cached(f"train {m} (seed {seed})", out[m])
            continue
        cmd = [sys.executable, "-m", "trainer.train", "--config", str(CONFIG), "--method", m, "--seed", str(seed),
               "--output", str(out[m]), f"--base.path={base_dir}", f"--data.cache_dir={models / 'demo' / 'encoded'}",
               f"--device={device}", *extra]
        if out[m].exists():
            shutil.rmtree(out[m])
        todo.append((m, cmd, marker, key))
    if todo:
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        lanes = [[t for t in todo if t[0] == "hywu"], [t for t in todo if t[0] != "hywu"]] if cpu and parallel else [todo]
        env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if cpu and parallel else {}),
               **({} if sys.stdout.isatty() else quiet_progress_bars())}
        with timer.stage(f"train {', '.join(t[0] for t in todo)} with python -m trainer.train (seed {seed})"):
            procs = []
            for lane in (lane for lane in lanes if lane):
                script = " && ".join(" ".join(_quote(c) for c in t[1]) for t in lane)
                log = out[lane[0][0]].with_name(f"{'+'.join(t[0] for t in lane)}-seed{seed}-{tag}.log")  # one per run
                log.parent.mkdir(parents=True, exist_ok=True)
                D.log("   " + script)
                procs.append((subprocess.Popen(["bash", "-c", script], cwd=REPO, env=env, stdout=open(log, "w"),
                                               stderr=subprocess.STDOUT), log))
            for p, log in procs:
                if p.wait() != 0:
                    raise RuntimeError(f"python -m trainer.train failed; its log:\n{log.read_text()[-4000:]}")
        for m, cmd, marker, key in todo:
            marker.write_text(json.dumps({"key": key, "command": cmd}))
    return out


def _quote(arg: str) -> str:
    return arg if all(c.isalnum() or c in "-_=./,[]:" for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


def run_files(runs: dict[str, Path], tasks) -> dict:
    """The files the trainer wrote in each method's output folder."""
    files = {}
    if "shared_lora" in runs:
        files["shared_lora"] = runs["shared_lora"] / "hywu_demo.safetensors"
    if "per_task_lora" in runs:
        files["per_task_lora"] = {t: runs["per_task_lora"] / f"hywu_demo-{t}.safetensors" for t in tasks}
    if "hywu" in runs:
        files["hywu"] = runs["hywu"] / "hywu_demo.safetensors"
    return files


def install_files(runs: dict[str, Path], models: Path, tasks) -> dict:
    """The trainer's outputs under the names users load in ComfyUI (models/loras, models/hywu)."""
    src = run_files(runs, tasks)
    (models / "loras").mkdir(parents=True, exist_ok=True)
    (models / "hywu").mkdir(parents=True, exist_ok=True)
    files = {"shared_lora": models / "loras" / SHARED_LORA_NAME,
             "per_task_lora": {t: models / "loras" / TASK_LORA_NAME.format(task=t) for t in tasks},
             "hywu": models / "hywu" / DEMO_GENERATOR_NAME}
    shutil.copyfile(src["shared_lora"], files["shared_lora"])
    for t, dst in files["per_task_lora"].items():
        shutil.copyfile(src["per_task_lora"][t], dst)
    shutil.copyfile(src["hywu"], files["hywu"])
    return files


def run_comfy(ckpt: Path, files: dict, world: D.World, val: D.Split, methods: dict, steps: int, cfg: float,
              seed: int, out: Path, n_images: int, show: bool) -> dict:
    """Run the demo workflow's API twin (HY-WU) on ``n_images`` val images, each edited with both
    instructions of a conflicting pair, and a core LoraLoaderModelOnly graph with the shared LoRA
    file; compare every ComfyUI edit with the in-process one (same seed)."""
    import comfy_harness
    from PIL import Image

    wf = json.loads((REPO / "example_workflows" / "api" / "hywu_demo.json").read_text())
    by_class = {v["class_type"]: k for k, v in wf.items()}
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    with comfy_harness.ComfyServer(checkpoints=[ckpt], loras=[files["shared_lora"]],
                                   extra_models={"hywu": [files["hywu"]]}) as srv:
        err = srv.pack_import_error()
        if err:
            raise RuntimeError(f"the HY-WU node pack did not import in ComfyUI:\n{err}")
        start_s = time.time() - t0
        picks = [i for i in range(len(val)) if val.tasks[i] == COMFY_PAIR[0]][:n_images]
        jobs = [(i, task, "hywu") for i in picks for task in COMFY_PAIR] + [(picks[0], COMFY_PAIR[0], "shared_lora")]
        for i, task, method in D.progress(jobs, desc="ComfyUI", enabled=show):
            text = synthetic.PHRASINGS[task]["train"][0]
            name = srv.put_input(Image.fromarray(val.src[i]), f"demo_src_{i}.png")
            prompt = lora_graph(wf, by_class, files["shared_lora"].name) if method == "shared_lora" else json.loads(json.dumps(wf))
            if method == "hywu":
                prompt[by_class["HYWULoadGenerator"]]["inputs"]["generator_name"] = files["hywu"].name
                prompt[by_class["HYWUConditionEncode"]]["inputs"]["instruction"] = text
            prompt[by_class["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = ckpt.name
            prompt[by_class["LoadImage"]]["inputs"]["image"] = name
            prompt[by_class["KSampler"]]["inputs"].update(seed=seed * 100003 + i, steps=steps, cfg=cfg,
                                                           sampler_name="euler", scheduler="simple", denoise=1.0)
            prompt[by_class["SaveImage"]]["inputs"]["filename_prefix"] = f"hywu_demo_{i}_{task}_{method}"
            img = np.asarray(Image.open(srv.output_images(srv.run(prompt, timeout=600))[0]).convert("RGB"))
            dst = out / f"comfyui_val{i:03d}_{task}_{method}.png"
            Image.fromarray(img).save(dst)
            target = synthetic.apply_task(task, val.src[i])
            mine = inprocess_edit(world, val, i, text, methods[method], steps, cfg, seed)
            rows.append({"image": int(i), "task": task, "method": method, "instruction": text,
                         "file": str(dst.relative_to(out.parent)), "psnr": float(D.psnr(img[None], target[None])[0]),
                         "psnr_vs_inprocess": float(D.psnr(img[None], mine[None])[0])})
    return {"ran": True, "server_start_s": round(start_s, 1), "seconds": round(time.time() - t0, 1),
            "workflow": "example_workflows/api/hywu_demo.json", "checkpoint": ckpt.name, "edits": rows}


def lora_graph(wf: dict, by_class: dict, lora_name: str) -> dict:
    """The demo graph with HY-WU's three nodes replaced by core CLIPTextEncode + LoraLoaderModelOnly."""
    g = json.loads(json.dumps(wf))
    enc, gen, apply = by_class["HYWUConditionEncode"], by_class["HYWUGenerateLoRA"], by_class["HYWUApplyGeneratedLoRA"]
    ckpt, load = [by_class["CheckpointLoaderSimple"]], by_class["HYWULoadGenerator"]
    text = g[enc]["inputs"]
    g[enc] = {"class_type": "CLIPTextEncode", "inputs": {"text": text["instruction"], "clip": text["clip"]}}
    g[apply] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": g[apply]["inputs"]["model"],
                                                                 "lora_name": lora_name, "strength_model": 1.0}}
    for k in (gen, load):
        g.pop(k)
    for node in g.values():  # rewire: Condition Encode's conditioning is output 1, CLIPTextEncode's is 0
        for key, v in node["inputs"].items():
            if isinstance(v, list) and v[0] == enc and v[1] == 1:
                node["inputs"][key] = [enc, 0]
            if isinstance(v, list) and v[0] == enc and v[1] == 2:  # Condition Encode's image output
                node["inputs"][key] = text["image"]
    del ckpt
    return g


def inprocess_edit(world: D.World, val: D.Split, i: int, text: str, method: D.Method, steps: int, cfg: float,
                   seed: int) -> np.ndarray:
    emb, mask = world.encode_text([text])
    one = replace(val, src=val.src[i:i + 1], tgt=val.tgt[i:i + 1], instructions=[text], tasks=[val.tasks[i]],
                  task_idx=val.task_idx[i:i + 1], src_lat=val.src_lat[i:i + 1], tgt_lat=val.tgt_lat[i:i + 1],
                  text=emb, mask=mask)
    with torch.no_grad():
        lat = world.sample(one.src_lat, one.text, [seed * 100003 + i], steps, cfg, method.lora_for(one, slice(0, 1)))
    return world.decode(lat)[0]


def models_folder(given: str | None, quick: bool) -> Path:
    """The models folder of a run: the one given, else models/, or models/quick/ for a --quick run
    (a quick run never replaces what a full `make demo` or bench run built there)."""
    return Path(given) if given else REPO / "models" / ("quick" if quick else "")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="make demo: HY-WU in a miniature world")
    ap.add_argument("--quick", action="store_true", help="tiny step counts (tests); numbers are meaningless")
    ap.add_argument("--out", default=None, help="results (default output/demo; with --quick output/demo-quick)")
    ap.add_argument("--models", default=None,
                    help="cache folder for built artefacts (default models/; with --quick models/quick/, so that a "
                         "quick run never replaces what a full one built)")
    ap.add_argument("--force", action="store_true", help="rebuild every cached stage")
    ap.add_argument("--micro", default=None, help="use this existing seeded micro base folder")
    ap.add_argument("--seed", type=int, default=0, help="seed of the three trainer runs (the base is built with seed 0)")
    ap.add_argument("--no-comfy", action="store_true", help="skip the headless ComfyUI run")
    ap.add_argument("--comfy-images", type=int, default=2, help="val images edited in ComfyUI (x2 instructions)")
    ap.add_argument("--eval-per-task", type=int, default=16,
                    help="evaluation images per task and split (bench/conflict.py scores 32 over 3 seeds)")
    ap.add_argument("--sample-steps", type=int, default=8, help="sampler steps of every edit (euler / simple)")
    ap.add_argument("--cfg", type=float, default=1.0, help="text guidance of every edit")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sequential", action="store_true", help="train the three methods one after the other")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a WorldSettings field, e.g. --set base_steps=400")
    ap.add_argument("--train", action="append", default=[], metavar="--SECTION.KEY=VALUE",
                    help="extra override for the three trainer runs, e.g. --train=--max-steps=200")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    a.models = str(models_folder(a.models, a.quick))
    a.out = a.out or str(REPO / "output" / ("demo-quick" if a.quick else "demo"))
    show = not a.no_progress  # bars on a terminal only, ETA lines otherwise (D.progress)
    if not sys.stdout.isatty():
        quiet_progress_bars()
    settings = (D.WorldSettings(**QUICK_WORLD) if a.quick else D.WorldSettings()).with_overrides(a.set)
    extra = (QUICK_TRAIN if a.quick else []) + list(a.train)
    eval_per_task = 2 if a.quick else a.eval_per_task
    steps = 2 if a.quick else a.sample_steps
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    models, out = Path(a.models), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    tasks = list(D.DEMO_TASKS)
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    D.log(f"HY-WU demo: device {device}, {settings.resolution}x{settings.resolution} images, adapter tasks "
          f"{', '.join(tasks)}")

    base_dir, ckpt = ensure_world(settings, models, a.force, timer, show, a.micro)
    runs = train_methods(base_dir, models, a.seed, a.force, timer, extra, device, parallel=not a.sequential)
    files = install_files(runs, models, tasks)

    with timer.stage("evaluate (val + held-out phrasing)"):
        world = D.World(base_dir, device)
        splits = {s: D.make_split(world, s, eval_per_task * len(tasks), tasks, 0, settings.resolution) for s in D.SPLITS}
        methods = D.load_methods(world, files, tasks)
        metrics, preds = D.evaluate(world, splits, methods, tasks, steps, a.cfg, a.seed, show)
        separation = {m: D.task_separation(splits["val"], methods[m]) for m in ("per_task_lora", "hywu")}
        clustering = D.text_clustering(world)
        editor = D.base_editor(world, eval_per_task, steps, a.cfg, settings.resolution)
    with timer.stage("gradient cosine of the shared LoRA"):
        init = methods["shared_lora"].lora
        g = torch.Generator().manual_seed(1)  # B = 0 gives A no gradient: a fresh LoRA with a small random B
        fresh = D.GeneratedLoRA({k: ((torch.rand(a_.shape, generator=g) * 2 - 1) / a_.shape[-1] ** 0.5,
                                     torch.randn(b_.shape, generator=g) * 1e-3)
                                 for k, (a_, b_) in init.weights.items()}, init.scale)
        gc = {"init": D.gradient_cosines(world, splits["val"], fresh, tasks),
              "trained": D.gradient_cosines(world, splits["val"], init, tasks)}

    comfy = {"ran": False}
    if not a.no_comfy:
        with timer.stage("ComfyUI: the demo workflow and a core LoRA graph, headless"):
            try:
                comfy = run_comfy(ckpt, files, world, splits["val"], methods, steps, a.cfg, a.seed, out / "images",
                                  a.comfy_images, show)
            except Exception as e:  # report it, keep the rest of the demo
                comfy = {"ran": False, "error": f"{type(e).__name__}: {e}"[:4000]}
                D.log(f"   ComfyUI run failed: {comfy['error'][:2000]}")

    with timer.stage("write output"):
        result = write_output(out, splits, preds, metrics, tasks, settings, a, gc, separation, clustering, comfy,
                              timer, device, files, runs, editor)
    # again with the "write output" stage itself in the timings
    result.update(timings_s={**timer.stages, "total": round(time.time() - timer.t0, 1)}, stage_timings=timer.rows)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=list))
    report(result, tasks)
    D.log("\nstage timings\n" + timer.table())
    return result


def write_output(out, splits, preds, metrics, tasks, settings, a, gc, separation, clustering, comfy, timer, device,
                 files, runs, editor) -> dict:
    from PIL import Image

    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    val = splits["val"]
    rows = []
    for t in tasks:  # two rows per task, conflicting partners next to each other
        rows += [i for i in range(len(val)) if val.tasks[i] == t][:2]
    for i in rows:
        Image.fromarray(val.src[i]).save(img_dir / f"val{i:03d}_{val.tasks[i]}_source.png")
        Image.fromarray(val.tgt[i]).save(img_dir / f"val{i:03d}_{val.tasks[i]}_target.png")
        for m in D.METHODS:
            Image.fromarray(preds["val"][m][i]).save(img_dir / f"val{i:03d}_{val.tasks[i]}_{m}.png")
    D.grid_png(out / "grid.png", val, preds["val"], rows)
    D.grid_png(out / "grid_heldout_phrasing.png", splits["heldout_phrasing"], preds["heldout_phrasing"], rows)
    summaries = {}
    for m in METHODS:
        f = runs[m] / "summary.json"
        if f.is_file():
            s = json.loads(f.read_text())
            summaries[m] = {k: s.get(k) for k in ("steps", "final_loss", "mean_loss_last_10", "samples_per_s", "peak_memory_mb")}
            times = s.get("step_times") or []
            summaries[m]["median_step_s"] = float(np.median(times)) if times else None
    result = {
        "world": asdict(settings), "seed": a.seed, "device": device, "tasks": tasks,
        "sampler": {"steps": 2 if a.quick else a.sample_steps, "cfg": a.cfg, "sampler": "euler", "scheduler": "simple"},
        "metrics": metrics, "base_editor": editor, "text_clustering": clustering, "gradient_cosine": gc,
        "lora_task_separation_val": separation,
        "comfyui": comfy, "trainer_runs": summaries,
        "files": {"grid": "grid.png", "grid_heldout_phrasing": "grid_heldout_phrasing.png", "images": "images/",
                  "generator": str(files["hywu"]), "shared_lora": str(files["shared_lora"])},
        "timings_s": {**timer.stages, "total": round(time.time() - timer.t0, 1)},
        "stage_timings": timer.rows,
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=list))
    return result


def report(result: dict, tasks) -> None:
    D.log("\n" + D.format_table(result["metrics"], tasks))
    e = result["base_editor"]
    D.log(f"The frozen base on its own pretraining tasks ({', '.join(e['tasks'])}; val, {e['n']} images): "
          f"{e['base']['overall']:.2f} dB, no edit {e['identity']['overall']:.2f} dB, VAE ceiling {e['vae_ceiling']['overall']:.2f} dB; "
          f"SSIM {e['base']['ssim']:.3f}, no edit {e['identity']['ssim']:.3f}, VAE ceiling {e['vae_ceiling']['ssim']:.3f}")
    c = result["text_clustering"]
    D.log(f"Text encoder: {c['heldout_accuracy']:.0%} of the {c['n_heldout']} held-out sentences are nearest their own "
          f"task (mean margin {c['heldout_margin']:.2f}); whole-condition cosine of opposite instructions: "
          + ", ".join(f"{k.replace('|', '/')} {v:.2f}" for k, v in c["pair_cosine"].items()))
    D.log(D.format_cosines(result["gradient_cosine"]))
    D.log("Task separation of the LoRAs applied on val (eta^2: 0 = one LoRA for all, 1 = one per task): "
          + ", ".join(f"{m} {v['eta2']:.2f} (spread {v['relative_spread']:.2f} of the mean)"
                      for m, v in result["lora_task_separation_val"].items()))
    comfy = result["comfyui"]
    if comfy.get("ran"):
        D.log(f"ComfyUI (server start {comfy['server_start_s']}s): " + "; ".join(
            f"val{e['image']} {e['method']} '{e['instruction']}' {e['psnr']:.1f} dB to the target, "
            f"{e['psnr_vs_inprocess']:.1f} dB to the in-process edit" for e in comfy["edits"]))
    else:
        D.log(f"ComfyUI: not run ({comfy.get('error', 'skipped')[:300]})")
    t = result["timings_s"]
    D.log(f"\nwrote output/demo (grid.png, metrics.json, images/) in {t['total']:.0f}s; stages: "
          + ", ".join(f"{k.split(' (')[0]} {v:.0f}s" for k, v in t.items() if k != "total"))


if __name__ == "__main__":
    main()
