#!/usr/bin/env python
"""The HY-WU graph in ComfyUI at real size, on the GPU ComfyUI picks (part of bench/gpu_check.sh).

Builds, with seeded RANDOM weights (nothing downloaded): a full-size SD1.5-InstructPix2Pix
ComfyUI checkpoint (UNet, CLIP-L, SD VAE from trainer/architectures, fp16) and an HY-WU
generator of the "small" preset for its full target set; then
  1. runs example_workflows/api/hywu_edit_sd15_ip2p.json in a real ComfyUI server (no --cpu) at
     ``--resolution`` px with ``--steps`` sampler steps, and the same graph without HY-WU
     (CLIP Text Encode instead of Condition Encode -> Generate -> Apply), interleaved, after a
     warm-up; reports Generate LoRA's time (the node's log line) as a share of the HY-WU run;
  2. in-process, checks that Generate LoRA leaves the generator offloaded: device memory
     allocated before / during / after, and where the weights are afterwards.
Prints one JSON object. ``--device cpu`` is a smoke test of the same code (small and slow).

    python bench/gpu_comfy.py                              # GPU, 512 px, 20 steps
    python bench/gpu_comfy.py --device cpu --resolution 64 --steps 1 --repeats 1
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests", REPO / "scripts"):
    sys.path.insert(0, str(p))

from comfy_overhead import GEN_RE, SD15_UNET_CONFIG  # noqa: E402  (the Generate LoRA log line, ComfyUI's SD1.5 layout)


def build_checkpoint(path: Path) -> Path:
    """A ComfyUI single-file SD1.5-IP2P checkpoint with seeded random weights (fp16)."""
    import torch
    from safetensors.torch import save_file

    import comfy.diffusers_convert
    import comfy.utils
    from trainer.full_bases import build_component

    sd = {}
    unet = build_component("sd15_ip2p", "unet", "cpu", seed=1).state_dict()
    key_map = comfy.utils.unet_to_diffusers(dict(SD15_UNET_CONFIG))
    missing = [k for k in unet if k not in key_map]
    if missing:
        raise KeyError(f"no LDM key for {missing[:5]}")
    sd.update({"model.diffusion_model." + key_map[k]: v for k, v in unet.items()})
    te = build_component("sd15_ip2p", "text_encoder", "cpu", seed=2).state_dict()
    sd.update({"cond_stage_model.transformer." + k: v for k, v in te.items() if not k.endswith("position_ids")})
    vae = build_component("sd15_ip2p", "vae", "cpu", seed=3).state_dict()
    sd.update({"first_stage_model." + k: v for k, v in comfy.diffusers_convert.convert_vae_state_dict(vae).items()})
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(path),
              metadata={"hywu": "random weights, benchmarks only"})
    return path


def build_generator(path: Path, resolution: int) -> Path:
    """A seeded "small" generator for the full SD1.5 target set; B head small but non-zero."""
    import torch

    from build_test_generator import _seed_b_head_
    from hywu_nodes.core import GeneratorConfig, HYWUGenerator, build_target_spec, save_generator, standard_condition_spec
    from trainer.full_bases import build_component

    spec = build_target_spec(build_component("sd15_ip2p", "unet"), "sd15_ip2p")
    torch.manual_seed(0)
    gen = HYWUGenerator(GeneratorConfig.from_preset("small", rank=16, alpha=16.0), spec,
                        standard_condition_spec(768, 77, 4, resolution))
    _seed_b_head_(gen, 1, 1e-3)
    save_generator(path, gen, extra={"note": "random weights, benchmarks only"})
    return path


def _graphs(ckpt: str, generator: str, image: str, steps: int, instruction: str):
    import hywu_graphs as g

    wf = g.load_api("hywu_edit_sd15_ip2p")
    by = {v["class_type"]: k for k, v in wf.items()}
    wf[by["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = ckpt
    wf[by["LoadImage"]]["inputs"]["image"] = image
    wf[by["HYWULoadGenerator"]]["inputs"]["generator_name"] = generator
    wf[by["HYWUConditionEncode"]]["inputs"]["instruction"] = instruction
    wf[by["KSampler"]]["inputs"].update(steps=steps, seed=0)
    plain = copy.deepcopy(wf)
    for cls in ("HYWULoadGenerator", "HYWUConditionEncode", "HYWUGenerateLoRA", "HYWUApplyGeneratedLoRA"):
        del plain[by[cls]]
    plain["100"] = {"class_type": "CLIPTextEncode", "inputs": {"text": instruction, "clip": [by["CheckpointLoaderSimple"], 1]}}
    plain[by["InstructPixToPixConditioning"]]["inputs"].update(positive=["100", 0], pixels=[by["LoadImage"], 0])
    plain[by["KSampler"]]["inputs"]["model"] = [by["CheckpointLoaderSimple"], 0]
    return wf, plain


def graph_timing(ckpt: Path, gen: Path, a) -> dict:
    import comfy_harness
    import hywu_graphs as g

    # --verbose DEBUG: Generate LoRA's timing line is a DEBUG line
    with comfy_harness.ComfyServer(checkpoints=[ckpt], extra_models={"hywu": [gen]}, cpu=a.device == "cpu",
                                   extra_args=["--verbose", "DEBUG"]) as srv:
        srv.put_input(g.make_test_image(0, a.resolution), "hywu_gpu_check.png")
        rows = {"hywu": [], "plain": []}
        for i in range(a.repeats + 1):  # the first round warms up (model load, kernels)
            for name in ("plain", "hywu"):
                wf = _graphs(ckpt.name, gen.name, "hywu_gpu_check.png", a.steps, f"make it winter, take {i}")[name == "plain"]
                n0 = len(srv.log_path.read_text(errors="replace"))
                entry = srv.run(wf, timeout=900)
                log = srv.log_path.read_text(errors="replace")[n0:]
                ts = {k: d.get("timestamp") for k, d in entry["status"]["messages"]}
                exec_s = (ts["execution_success"] - ts["execution_start"]) / 1000.0
                if i:
                    rows[name].append({"exec_s": exec_s, "generate_lora_s": sum(float(x) for x in GEN_RE.findall(log))})
        log_device = [x for x in srv.log_path.read_text(errors="replace").splitlines() if x.startswith(("Device:", "Total VRAM"))]
    h = {k: statistics.median(r[k] for r in rows["hywu"]) for k in rows["hywu"][0]}
    p = statistics.median(r["exec_s"] for r in rows["plain"])
    return {"hywu_exec_s": h["exec_s"], "plain_exec_s": p, "generate_lora_s": h["generate_lora_s"],
            "generate_lora_share": h["generate_lora_s"] / h["exec_s"], "hywu_over_plain": h["exec_s"] / p,
            "runs": rows, "server_device": log_device}


def offload_check(ckpt: Path, gen: Path, a) -> dict:
    """Generate LoRA in-process: the generator is on the compute device only while it runs."""
    import torch

    import comfy_harness

    comfy_harness.import_comfy(extra_modules=("comfy.sd", "comfy.utils", "comfy.model_management", "folder_paths",
                                              "comfy.lora", "comfy_api.latest"), cpu=a.device == "cpu")
    import comfy.model_management as mm
    import comfy.sd

    from hywu_nodes.nodes.encode import HYWUConditionEncode
    from hywu_nodes.nodes.generate import HYWUGenerateLoRA
    from hywu_nodes.nodes.load_generator import load_generator_handle

    cuda = torch.cuda.is_available() and a.device != "cpu"
    mem = (lambda: torch.cuda.memory_allocated() / 2**20) if cuda else (lambda: None)  # no device memory on a CPU
    _, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)
    handle = load_generator_handle(str(gen))
    images = torch.rand(1, a.resolution, a.resolution, 3, generator=torch.Generator().manual_seed(0))
    # the nodes' own entry points, with the inputs a graph gives them
    encoded = HYWUConditionEncode.execute(image=images, instruction="make it winter", clip=clip, generator=handle, vae=vae)[0]
    mm.unload_all_models()
    before = mm_before = mem()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    HYWUGenerateLoRA.execute(generator=handle, hywu_cond=encoded)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    after = mem()
    devices = sorted({str(p.device) for p in handle.patcher.model.parameters()})
    weights_mb = sum(p.numel() * p.element_size() for p in handle.patcher.model.parameters()) / 2**20
    return {"generator_weights_mb": weights_mb, "allocated_before_mb": before, "peak_during_mb": peak,
            "allocated_after_mb": after, "weights_device_after": devices, "offload_device": str(mm.unet_offload_device()),
            "offloaded": devices == [str(mm.unet_offload_device())] and (not cuda or after - mm_before < 0.5 * weights_mb),
            "generate_lora_s": seconds, "dtype": str(handle.dtype)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the built checkpoint and generator (default: temporary)")
    a = ap.parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device visible; use --device cpu for a smoke test"}))
        return 1
    import comfy_harness

    comfy_harness.import_comfy(extra_modules=("comfy.utils", "comfy.diffusers_convert"), cpu=a.device == "cpu")
    work = Path(a.work or tempfile.mkdtemp(prefix="hywu_gpu_comfy_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = work / "hywu_random_sd15_ip2p.safetensors"
    if not ckpt.is_file():
        build_checkpoint(ckpt)
    gen = build_generator(work / f"hywu_random_small_{a.resolution}.safetensors", a.resolution)
    built = time.perf_counter() - t0
    out = {"ok": False, "device": a.device, "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
           "resolution": a.resolution, "steps": a.steps, "repeats": a.repeats, "random_weights": True, "build_s": built,
           "load_average_1m": round(os.getloadavg()[0], 2)}
    out["graph"] = graph_timing(ckpt, gen, a)
    out["offload"] = offload_check(ckpt, gen, a)
    out["ok"] = bool(out["offload"]["offloaded"])
    print(json.dumps(out, indent=1))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
