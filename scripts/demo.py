#!/usr/bin/env python
"""`make demo`: the whole HY-WU product in a miniature world, on a CPU, with no downloads.

1. builds (or reuses) the seeded micro SD1.5-InstructPix2Pix base (scripts/build_micro_base.py)
   and trains it briefly on the synthetic edit world (trainer/synthetic.py) into a usable but
   imperfect editor -> models/demo/base/ (diffusers) + models/checkpoints/hywu_demo_sd15_ip2p.safetensors;
2. freezes it and trains, with one and the same budget, a shared LoRA, per-task LoRAs (an
   oracle told the task) and the HY-WU generator -> models/hywu/hywu_demo.safetensors;
3. evaluates PSNR / SSIM to the exact targets on the val and held-out-phrasing splits and the
   shared LoRA's gradient cosine between conflicting tasks;
4. runs example_workflows/api/hywu_demo.json (the demo template's API twin) in a headless
   ComfyUI on a few validation images with a conflicting pair of instructions;
5. writes output/demo/ (edited images, grid.png, metrics.json) and prints the table.

Every stage is cached (models/, git-ignored): a second run reuses what is still valid.

    python scripts/demo.py [--quick] [--no-comfy] [--force] [--out output/demo] [--models models]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "tests")]


def _threads() -> int:
    """CPU threads for torch: HYWU_THREADS, else the cores not already busy (OpenMP threads that
    spin-wait on cores shared with other jobs make small-model training several times slower)."""
    if os.environ.get("HYWU_THREADS"):
        return max(1, int(os.environ["HYWU_THREADS"]))
    n = os.cpu_count() or 1
    try:
        busy = int(round(os.getloadavg()[0]))
    except OSError:
        busy = 0
    return max(1, min(n, n - busy))


if _threads() < (os.cpu_count() or 1):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must be set before torch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import demo_core as D  # noqa: E402

# The conflicting pair the ComfyUI part edits with (both instructions on the same images).
COMFY_PAIR = (("shift_left", "shift the image left"), ("shift_right", "shift the image right"))
DEMO_CKPT_NAME = "hywu_demo_sd15_ip2p.safetensors"
DEMO_GENERATOR_NAME = "hywu_demo.safetensors"

QUICK = dict(n_train=56, vae_steps=2, vae_batch=4, base_steps=2, base_batch=4, steps=2, batch=4,
             n_eval_per_task=1, sample_steps=2)


class Timer:
    def __init__(self):
        self.t0 = time.time()
        self.stages: dict[str, float] = {}

    def stage(self, name: str):
        timer = self

        class _S:
            def __enter__(self):
                self.t = time.time()
                D.log(f"\n== {name}")

            def __exit__(self, *exc):
                timer.stages[name] = round(timer.stages.get(name, 0.0) + time.time() - self.t, 1)
                D.log(f"   ({name}: {time.time() - self.t:.1f}s)")
        return _S()


def comfy_path():
    import build_micro_base as bmb

    return bmb.find_comfyui(None)


def ensure_bases(settings: D.DemoSettings, models: Path, force: bool, timer: Timer, show: bool,
                 micro: Path | None = None):
    import build_micro_base as bmb

    comfy = comfy_path()
    if micro is not None:
        micro_dir = Path(micro)
    else:
        micro_dir = models / "micro_sd15_ip2p"
        with timer.stage("micro base (seeded, build or reuse)"):
            bmb.ensure_micro_base(micro_dir, models / "checkpoints" / "hywu_micro_sd15_ip2p.safetensors",
                                  comfyui_path=comfy)
    base_dir = models / "demo" / "base"
    ckpt = models / "checkpoints" / DEMO_CKPT_NAME
    if force or not D.base_is_current(base_dir, settings):
        with timer.stage("pretrain micro base on the synthetic world (VAE + IP2P UNet)"):
            info = D.pretrain_base(micro_dir, base_dir, settings, show=show)
            D.log(f"   VAE loss {info['vae_final_loss']:.4f}, UNet loss {info['unet_final_loss']:.4f}")
        if ckpt.exists():
            ckpt.unlink()
    else:
        D.log(f"\n== reusing the pretrained demo base {base_dir}")
    if not ckpt.is_file() or ckpt.stat().st_mtime < (base_dir / "hywu_demo_base.json").stat().st_mtime:
        with timer.stage("export ComfyUI checkpoint"):
            bmb.export_comfy_checkpoint(base_dir, ckpt, comfy)
    return base_dir, ckpt


def train_with_trainer(base_dir: Path, dst: Path, settings: D.DemoSettings, force: bool, timer: Timer):
    """`python -m trainer.train` (trainer/configs/demo.yaml) on the demo base -> ``dst``."""
    import shutil
    import subprocess

    marker = dst.with_name(dst.stem + ".trainer.json")
    key = settings.method_key("hywu")
    world_dev = D.pick_device(settings.device)
    if not force and dst.is_file() and marker.is_file() and json.loads(marker.read_text()).get("settings_key") == key:
        D.log(f"\n== reusing {dst} (python -m trainer.train)")
    else:
        out = REPO / "output" / "train" / "demo"
        cmd = [sys.executable, "-m", "trainer.train", f"--base.path={base_dir}", "--output", str(out),
               "--max-steps", str(settings.steps), f"--train.batch_size={settings.batch}", f"--train.lr={settings.lr}",
               f"--generator.rank={settings.rank}", f"--generator.alpha={settings.alpha}",
               f"--generator.preset={settings.generator_preset}", f"--generator.token_width={settings.token_width}", f"--base.resolution={settings.resolution}",
               f"--data.n_train={settings.n_train}", "--data.tasks=[" + ",".join(settings.tasks) + "]",
               f"--seed={settings.seed}", f"--device={'cuda' if world_dev.type == 'cuda' else 'cpu'}"]
        with timer.stage(f"train hywu with python -m trainer.train ({settings.steps} steps)"):
            D.log("   " + " ".join(cmd))
            subprocess.run(cmd, cwd=REPO, check=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "demo.safetensors", dst)
        marker.write_text(json.dumps({"settings_key": key, "command": cmd}))
    return D.generator_adapter(dst, world_dev)


def run_comfy(ckpt: Path, generator: Path, val: D.EncodedSplit, settings: D.DemoSettings, out: Path,
              n_images: int, show: bool, world=None, hywu=None) -> dict:
    """Run the demo workflow's API twin in a headless ComfyUI: each of n val images edited with
    both instructions of a conflicting pair. Returns a summary (with PSNR to the exact target)."""
    import comfy_harness
    from PIL import Image

    from trainer import synthetic

    wf = json.loads((REPO / "example_workflows" / "api" / "hywu_demo.json").read_text())
    by_class = {v["class_type"]: k for k, v in wf.items()}
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.time()
    with comfy_harness.ComfyServer(checkpoints=[ckpt], extra_models={"hywu": [generator]}) as srv:
        err = srv.pack_import_error()
        if err:
            raise RuntimeError(f"the HY-WU node pack did not import in ComfyUI:\n{err}")
        start_s = time.time() - t0
        picks = [i for i in range(len(val)) if val.tasks[i] in (COMFY_PAIR[0][0], COMFY_PAIR[1][0])][:n_images]
        jobs = [(i, task, text) for i in picks for task, text in COMFY_PAIR]
        for k, (i, task, text) in enumerate(D.progress(jobs, desc="ComfyUI workflow", enabled=show)):
            src_name = srv.put_input(Image.fromarray(val.src[i]), f"demo_src_{i}.png")
            prompt = json.loads(json.dumps(wf))
            prompt[by_class["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = ckpt.name
            prompt[by_class["HYWULoadGenerator"]]["inputs"]["generator_name"] = generator.name
            prompt[by_class["LoadImage"]]["inputs"]["image"] = src_name
            prompt[by_class["HYWUConditionEncode"]]["inputs"]["instruction"] = text
            ks = prompt[by_class["KSampler"]]["inputs"]
            ks.update(seed=settings.seed * 100003 + i, steps=settings.sample_steps, cfg=settings.cfg,
                      sampler_name="euler", scheduler="simple")
            prompt[by_class["SaveImage"]]["inputs"]["filename_prefix"] = f"hywu_demo_{i}_{task}"
            entry = srv.run(prompt, timeout=600)
            files = srv.output_images(entry)
            img = np.asarray(Image.open(files[0]).convert("RGB"))
            dst = out / f"comfyui_val{i:03d}_{task}.png"
            Image.fromarray(img).save(dst)
            target = synthetic.apply_task(task, val.src[i])
            row = {"image": int(i), "task": task, "instruction": text, "file": str(dst.relative_to(out.parent)),
                   "psnr": float(D.psnr(img[None], target[None])[0]),
                   "ssim": float(D.ssim(img[None], target[None])[0])}
            if world is not None and hywu is not None:  # parity: the same edit in-process (same seed)
                with torch.no_grad():
                    src, emb = val.src_lat[i:i + 1], world.encode_text([text])
                    lora = hywu.lora_for(world, emb, src, val.task_idx[i:i + 1])
                    mine = world.decode(D.sample(world, src, emb, [settings.seed * 100003 + i], settings, lora))[0]
                row["psnr_vs_inprocess"] = float(D.psnr(img[None], mine[None])[0])
            rows.append(row)
    return {"ran": True, "server_start_s": round(start_s, 1), "seconds": round(time.time() - t0, 1),
            "workflow": "example_workflows/api/hywu_demo.json", "checkpoint": ckpt.name, "generator": generator.name,
            "edits": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="make demo: HY-WU in a miniature world")
    ap.add_argument("--quick", action="store_true", help="tiny step counts (tests); numbers are meaningless")
    ap.add_argument("--out", default=str(REPO / "output" / "demo"))
    ap.add_argument("--models", default=str(REPO / "models"), help="cache folder for built artefacts")
    ap.add_argument("--force", action="store_true", help="rebuild every cached stage")
    ap.add_argument("--micro", default=None, help="use this existing seeded micro base folder (default: build/reuse <models>/micro_sd15_ip2p)")
    ap.add_argument("--no-comfy", action="store_true", help="skip the headless ComfyUI run")
    ap.add_argument("--comfy-images", type=int, default=2, help="val images edited in ComfyUI (x2 instructions)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--trainer", action="store_true",
                    help="train the HY-WU generator with `python -m trainer.train` (the demo config) instead of "
                         "in-process (same settings; slower on CPU: it re-encodes every instruction with CLIP)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a DemoSettings field, e.g. --set steps=300")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    show = not a.no_progress

    settings = D.DemoSettings(device=a.device)
    if a.quick:
        settings = replace(settings, **QUICK)
    for kv in a.set:
        k, _, v = kv.partition("=")
        cur = getattr(settings, k)
        settings = replace(settings, **{k: type(cur)(v) if not isinstance(cur, tuple) else tuple(v.split(","))})
    torch.set_num_threads(_threads())
    models, out = Path(a.models), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    D.log(f"HY-WU demo: device {D.pick_device(settings.device)}, tasks {', '.join(settings.tasks)}, "
          f"{settings.resolution}x{settings.resolution} images")

    base_dir, ckpt = ensure_bases(settings, models, a.force, timer, show, a.micro)

    with timer.stage("encode the synthetic world"):
        world = D.load_world(base_dir, settings)
        train_cache = base_dir / "train_encoded.safetensors"
        train = D.make_split("train", settings.n_train, settings)
        if train_cache.is_file():
            c = load_file(str(train_cache))
            train.src_lat, train.tgt_lat, train.text = (c[k].to(world.device) for k in ("src_lat", "tgt_lat", "text"))
        else:
            D.encode_split(world, train)
        n_eval = settings.n_eval_per_task * len(settings.tasks)
        splits = {s: D.encode_split(world, D.make_split(s, n_eval, settings)) for s in D.SPLITS}

    adapters = {"base": None}
    paths = {"shared_lora": models / "demo" / "shared_lora.safetensors",
             "per_task_lora": models / "demo" / "per_task_lora.safetensors",
             "hywu": models / "hywu" / DEMO_GENERATOR_NAME}
    losses = {}
    for method in ("shared_lora", "per_task_lora", "hywu"):
        if method == "hywu" and a.trainer:
            adapters[method] = train_with_trainer(base_dir, paths[method], settings, a.force, timer)
            continue
        cached = None if a.force else D.load_adapter(method, paths[method], world, settings)
        if cached is not None:
            D.log(f"\n== reusing {method} from {paths[method]}")
            adapters[method] = cached
            continue
        with timer.stage(f"train {method} ({settings.steps} steps x batch {settings.batch})"):
            ad, ls = D.train_method(method, world, train, settings, show=show)
            losses[method] = float(np.mean(ls[-20:]))
            D.save_adapter(ad, paths[method], settings, {"final_loss": losses[method]})
            adapters[method] = ad

    with timer.stage("evaluate (val + held-out phrasing)"):
        metrics, preds = D.evaluate(world, splits, adapters, settings, show=show)
    with timer.stage("gradient cosine of the shared LoRA"):
        init = D.Adapter("shared_lora", world, settings, seed=1)
        with torch.no_grad():  # B=0 gives A no gradient: start from a small random B instead
            for b in init.static.b:
                b.normal_(0, 1e-3)
        gc = {"init": D.gradient_cosines(world, splits["val"], settings, init),
              "trained": D.gradient_cosines(world, splits["val"], settings, adapters["shared_lora"])}

    separation = {m: D.task_separation(world, splits[sp], adapters[m]) for m in ("per_task_lora", "hywu")
                  for sp in ("val",)}
    comfy = {"ran": False}
    if not a.no_comfy:
        with timer.stage("ComfyUI: example_workflows/api/hywu_demo.json headless"):
            try:
                comfy = run_comfy(ckpt, paths["hywu"], splits["val"], settings, out / "images", a.comfy_images, show,
                                  world, adapters["hywu"])
            except Exception as e:  # report, keep the rest of the demo
                comfy = {"ran": False, "error": f"{type(e).__name__}: {e}"[:4000]}
                D.log(f"   ComfyUI run failed: {comfy['error'][:2000]}")

    with timer.stage("write output"):
        from PIL import Image

        img_dir = out / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        val = splits["val"]
        rows = []
        per = max(1, min(2, settings.n_eval_per_task))
        for t in settings.tasks:  # `per` rows per task, conflicting partners next to each other
            rows += [i for i in range(len(val)) if val.tasks[i] == t][:per]
        for i in rows:
            Image.fromarray(val.src[i]).save(img_dir / f"val{i:03d}_{val.tasks[i]}_source.png")
            Image.fromarray(val.tgt[i]).save(img_dir / f"val{i:03d}_{val.tasks[i]}_target.png")
            for m in ("base", "shared_lora", "per_task_lora", "hywu"):
                Image.fromarray(preds["val"][m][i]).save(img_dir / f"val{i:03d}_{val.tasks[i]}_{m}.png")
        D.grid_png(out / "grid.png", val, preds["val"], rows)
        D.grid_png(out / "grid_heldout_phrasing.png", splits["heldout_phrasing"], preds["heldout_phrasing"], rows)
        total = round(time.time() - timer.t0, 1)
        result = {
            "settings": asdict(settings),
            "device": str(world.device),
            "metrics": metrics,
            "gradient_cosine": gc,
            "lora_task_separation_val": separation,
            "comfyui": comfy,
            "final_train_loss": losses,
            "timings_s": {**timer.stages, "total": total},
            "files": {"grid": "grid.png", "grid_heldout_phrasing": "grid_heldout_phrasing.png", "images": "images/"},
        }
        (out / "metrics.json").write_text(json.dumps(result, indent=2, default=list))

    D.log("\n" + D.format_table(metrics, settings))
    D.log(D.format_cosines(gc))
    D.log("Task separation of the LoRAs actually applied on val (eta^2: 0 = one LoRA for all, 1 = one per task): "
          + ", ".join(f"{m} {v['eta2']:.2f} (spread {v['relative_spread']:.2f} of the mean)" for m, v in separation.items()))
    if comfy.get("ran"):
        ed = comfy["edits"]
        D.log(f"ComfyUI ({comfy['workflow']}, server start {comfy['server_start_s']}s): "
              + ", ".join(f"val{e['image']} '{e['instruction']}' {e['psnr']:.1f} dB to target, "
                           f"{e.get('psnr_vs_inprocess', float('nan')):.1f} dB to the in-process edit" for e in ed))
    else:
        D.log(f"ComfyUI: not run ({comfy.get('error', 'skipped')[:300]})")
    D.log(f"\nwrote {out}/ (grid.png, metrics.json, images/) in {total:.0f}s; stages: "
          + ", ".join(f"{k.split(' (')[0]} {v:.0f}s" for k, v in timer.stages.items()))
    return result


if __name__ == "__main__":
    main()
