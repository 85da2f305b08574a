#!/usr/bin/env python
"""What HY-WU costs inside ComfyUI, measured side by side in one run. Prints one JSON object.

micro base (a headless ComfyUI server, the newest `make test` runs on, the seeded micro SD1.5-InstructPix2Pix checkpoint
and seeded test generator, 64 px, euler, ``--steps`` (20) at cfg ``--cfg`` (7)):
  * ``edit``: one HY-WU edit (runtime mode, and patch mode) against the same graph with a static
    LoRA file through core LoraLoaderModelOnly, on a first run (after POST /free: caches empty,
    models unloaded) and on a rerun with only the instruction changed. Goal: runtime <= 1.10x.
  * ``batch_8``: 8 different edits in one sampler batch (one image, 8 instruction lines, 8
    generated LoRAs at runtime) against 8 identical edits with one static LoRA (the image
    repeated 8 times), reruns with changed instructions. Goal: <= 1.2x.
  * ``batch_8_sampler_inprocess``: the sampler alone (in-process, ``--steps``/4 steps): the batch
    of 8 edits with 8 runtime LoRAs against the same batch with one LoRA patched into the
    weights, and the runtime LoRAs' own work timed inside the steps.
  * ``load_inprocess``: ComfyUI's model load of the plain, weight-patched and runtime clone (the
    weight patching patch mode repeats for every new request).
full-size SD1.5-InstructPix2Pix UNet (diffusers' default UNet2DConditionModel config with 8 input
channels, seeded random weights, no download; cached in models/bench/), 512 px, cfg batch 2:
  * ``full_size.timing``: the "small" generator's forward (rank 16, 160 target layers) and the
    per-step cost of the runtime LoRA, as shares of one sampling step. Goal: the generator is
    at most 5% of a 20-step run.
  * ``full_size.memory``: peak resident memory of loading and sampling (one step at
    ``--memory-resolution``, 256 px by default: activations are the same in every mode) with the
    plain, the patched and the runtime model above the loaded plain model, each in a fresh
    process, against the size of the targeted weights (patch mode keeps a backup copy of each;
    runtime mode keeps none).

Timings are medians (and minima: the run least disturbed by other jobs) of ``--repeats``
interleaved measurements in rotating order; ratios compare numbers taken in the same run. Torch runs with ``--threads`` threads (1 by default: on a shared machine more
threads than free cores make every step wait on the others).

    .venv/bin/python bench/comfy_overhead.py [--steps 20] [--cfg 7] [--repeats 3] [--threads 1]
        [--skip-full | --skip-micro] [--full-steps 1] [--full-repeats 3] [--out result.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests", REPO / "scripts"):
    sys.path.insert(0, str(p))

CACHE = REPO / "models" / "bench"
FULL_UNET = CACHE / "sd15_ip2p_full_seeded_ldm.safetensors"
FULL_GENERATOR = CACHE / "hywu_sd15_full_small.safetensors"
FULL_LORA = CACHE / "hywu_sd15_full_small_lora.safetensors"
RANK, ALPHA, RESOLUTION = 16, 64.0, 512
# ComfyUI's SD1.5 UNet layout (comfy.model_detection SD15), for comfy.utils.unet_to_diffusers
SD15_UNET_CONFIG = dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)

GEN_RE = re.compile(r"HY-WU: generated \d+ LoRA\(s\) .* in ([0-9.]+) s")
APPLY_RE = re.compile(r"HY-WU: applied .* in ([0-9.]+) s")
ENCODE_RE = re.compile(r"HY-WU: encoded the condition .* in ([0-9.]+) s")


# ---------------------------------------------------------------------------------------------
# micro base, through the server
# ---------------------------------------------------------------------------------------------
def _exec_seconds(entry) -> float:
    ts = {name: data.get("timestamp") for name, data in entry["status"]["messages"]}
    return (ts["execution_success"] - ts["execution_start"]) / 1000.0


def _free(srv):
    import requests

    requests.post(srv.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=30)
    time.sleep(1.5)


def _timed(srv, wf) -> dict:
    n0 = len(srv.log_path.read_text(errors="replace"))
    entry = srv.run(wf, timeout=1800)
    assert srv.output_images(entry)
    time.sleep(0.3)
    log = srv.log_path.read_text(errors="replace")[n0:]
    return {"exec_s": _exec_seconds(entry),
            "generate_lora_s": sum(float(x) for x in GEN_RE.findall(log)),
            "apply_node_s": sum(float(x) for x in APPLY_RE.findall(log)),
            "condition_encode_s": sum(float(x) for x in ENCODE_RE.findall(log))}


def _stats(rows: list[dict]) -> dict:
    """Medians of every field, plus the fastest run: on a shared machine the minimum is the run
    least disturbed by other jobs."""
    out = {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}
    out["exec_s_min"] = round(min(r["exec_s"] for r in rows), 3)
    out["exec_s_all"] = [round(r["exec_s"], 3) for r in rows]
    return out


def _ratio(a, b) -> float:
    return round(a / b, 3)


def micro_sections(a) -> dict:
    import build_micro_base
    import build_test_generator
    import comfy_harness
    import hywu_graphs as g

    _, ckpt = build_micro_base.ensure_micro_base()
    gens = build_test_generator.build_test_generators()
    generator = Path(gens["seeded"]).name
    env = {"OMP_NUM_THREADS": str(a.threads)}
    # --verbose DEBUG: the nodes' per-prompt timing lines parsed below are DEBUG lines
    with comfy_harness.ComfyServer(checkpoints=[ckpt], extra_models={"hywu": [gens["seeded"]]}, env=env,
                                   extra_args=["--verbose", "DEBUG"]) as srv:
        srv.put_input(g.make_test_image(0), g.load_api("hywu_demo")["2"]["inputs"]["image"])
        srv.run(g.lora_only("a fixed style", "loras/hywu_bench_static", generator=generator), timeout=600)
        static_file = sorted((srv.output_dir / "loras").glob("hywu_bench_static_*.safetensors"))[-1]

        def hywu(instr, mode):
            return g.demo(instruction=instr, seed=a.seed, steps=a.steps, cfg=a.cfg, generator=generator,
                          prefix="bench_hywu", mode=mode, batch_index=-1 if mode == "runtime" else 0)

        def static(instr, copies=1):
            wf = g.with_static_lora(g.plain(instruction=instr, seed=a.seed, steps=a.steps, cfg=a.cfg,
                                            prefix="bench_static"), static_file.name)
            if copies > 1:  # the same edit `copies` times: the image repeated, one latent each
                wf["20"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": copies}}
                wf["8"]["inputs"]["pixels"] = ["20", 0]
            return wf

        graphs = {"static_lora": lambda i: static(i), "hywu_runtime": lambda i: hywu(i, "runtime"),
                  "hywu_patch": lambda i: hywu(i, "patch")}
        for make in graphs.values():  # warm-up: imports, first kernels
            srv.run(make("warm up"), timeout=1800)
        edit = {name: {"first_run": [], "rerun_instruction_changed": []} for name in graphs}
        for r in range(a.repeats):  # interleaved and rotated, so every graph sees the same machine load
            order = list(graphs.items())
            for name, make in order[r % len(order):] + order[:r % len(order)]:
                _free(srv)
                edit[name]["first_run"].append(_timed(srv, make(f"make it a snowy winter scene {r}")))
                edit[name]["rerun_instruction_changed"].append(_timed(srv, make(f"turn it into an oil painting {r}")))
        edit = {name: {run: _stats(rows) for run, rows in runs.items()} for name, runs in edit.items()}
        for run in ("first_run", "rerun_instruction_changed"):
            s, h = edit["static_lora"][run], {m: edit[f"hywu_{m}"][run] for m in ("runtime", "patch")}
            edit[f"summary_{run}"] = {
                "static_lora_s": s["exec_s"], **{f"{m}_s": h[m]["exec_s"] for m in h},
                **{f"ratio_{m}_vs_static": _ratio(h[m]["exec_s"], s["exec_s"]) for m in h},
                **{f"ratio_{m}_vs_static_fastest_runs": _ratio(h[m]["exec_s_min"], s["exec_s_min"]) for m in h},
                "share_generate_lora_runtime": round(h["runtime"]["generate_lora_s"] / h["runtime"]["exec_s"], 4),
                "share_condition_encode_runtime": round(h["runtime"]["condition_encode_s"] / h["runtime"]["exec_s"], 4),
            }

        n = 8
        batch = {"hywu_8_different_edits": [], "static_lora_8_identical_edits": []}
        srv.run(hywu([f"warm up {i}" for i in range(n)], "runtime"), timeout=1800)
        srv.run(static("warm up", n), timeout=1800)
        for r in range(a.repeats):
            edits = [f"edit number {i}, take {r}" for i in range(n)]
            runs = [("hywu_8_different_edits", hywu(edits, "runtime")), ("static_lora_8_identical_edits", static(edits[0], n))]
            for name, wf in runs[r % 2:] + runs[:r % 2]:
                batch[name].append(_timed(srv, wf))
        batch = {k: _stats(v) for k, v in batch.items()}
        h, s = batch["hywu_8_different_edits"], batch["static_lora_8_identical_edits"]
        batch["ratio_hywu_vs_static"] = _ratio(h["exec_s"], s["exec_s"])
        batch["ratio_hywu_vs_static_fastest_runs"] = _ratio(h["exec_s_min"], s["exec_s_min"])
        batch["share_condition_encode_hywu"] = round(h["condition_encode_s"] / h["exec_s"], 4)
        batch["share_generate_lora_hywu"] = round(h["generate_lora_s"] / h["exec_s"], 4)
        from safetensors.torch import load_file

        static_lora = load_file(str(static_file))
    return {"edit": edit, "batch_8": batch, "load_inprocess": _load_inprocess(ckpt, static_lora, a.repeats),
            "batch_8_sampler_inprocess": _batch_sampler_inprocess(ckpt, gens["seeded"], n, a)}


def _import_comfy():
    import comfy_harness

    comfy_harness.import_comfy(extra_modules=("comfy.sd", "comfy.utils", "comfy.model_management", "folder_paths",
                                              "comfy.lora", "comfy_api.latest", "comfy.sample", "comfy.samplers"))


def _time_runtime_work(patcher) -> list:
    """Time the runtime LoRA's own work inside the steps of ``patcher`` (CPU ops are synchronous):
    robust to the machine's load, unlike the difference of two step times. Returns the counter."""
    import comfy.patcher_extension

    from hywu_nodes.nodes import runtime_lora

    runtime = patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, runtime_lora.WRAPPER_KEY)[0]
    spent, add_delta = [0.0], runtime.add_delta

    def timed(*args):
        t = time.perf_counter()
        out = add_delta(*args)
        spent[0] += time.perf_counter() - t
        return out

    runtime.add_delta = timed
    return spent


def _batch_sampler_inprocess(checkpoint, generator_path, n: int, a) -> dict:
    """The sampler alone, in-process: a batch of n edits with n runtime LoRAs against the same
    batch with one LoRA patched into the weights (same conditioning, latents and noise)."""
    _import_comfy()
    import comfy.sd
    import torch

    from hywu_nodes.nodes.apply import HYWUApplyGeneratedLoRA
    from hywu_nodes.nodes.encode import HYWUConditionEncode
    from hywu_nodes.nodes.generate import generate_loras
    from hywu_nodes.nodes.load_generator import load_generator_handle

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)
    handle = load_generator_handle(str(generator_path))
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    enc, cond, images = HYWUConditionEncode.execute(image, "\n".join(f"edit number {i}" for i in range(n)), clip, True,
                                                    generator=handle, vae=vae).args
    lora = generate_loras(handle, enc)
    concat = vae.encode(images)
    neg = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    pos = [[cond[0][0], {"pooled_output": cond[0][1]["pooled_output"], "concat_latent_image": concat}]]
    negc = [[neg[0], {"pooled_output": neg[1], "concat_latent_image": concat}]]
    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    models = {"runtime_n_loras": HYWUApplyGeneratedLoRA.execute(model, lora, 1.0, -1, "runtime").args[0],
              "patch_one_lora": HYWUApplyGeneratedLoRA.execute(model, lora, 1.0, 0, "patch").args[0]}
    spent = _time_runtime_work(models["runtime_n_loras"])
    steps = max(2, a.steps // 4)
    times, share = {k: [] for k in models}, []
    _sample(models["patch_one_lora"], 1, a.cfg, (noise, pos, negc))  # warm-up
    for r in range(a.repeats):
        order = list(models.items())
        for name, m in order[r % 2:] + order[:r % 2]:
            spent[0] = 0.0
            t0 = time.perf_counter()
            _sample(m, steps, a.cfg, (noise, pos, negc))
            times[name].append((time.perf_counter() - t0) / steps)
            if name == "runtime_n_loras":
                share.append(spent[0] / (times[name][-1] * steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"edits": n, "steps": steps, "step_s": {k: round(v, 4) for k, v in med.items()},
            "step_s_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "ratio_runtime_vs_patch": _ratio(med["runtime_n_loras"], med["patch_one_lora"]),
            "runtime_lora_share_of_step_timed_inside": round(statistics.median(share), 4)}


def _load_inprocess(checkpoint, lora: dict, repeats: int) -> dict:
    """Seconds ComfyUI spends loading the plain model, the weight-patched clone (it patches every
    targeted weight on load, again for each new LoRA) and the runtime clone."""
    _import_comfy()
    import comfy.model_management as mm
    import comfy.sd

    from hywu_nodes.nodes.apply import apply_lora, apply_runtime_lora

    model = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)[0]
    times = {"plain": [], "patch": [], "runtime": []}
    for _ in range(repeats):
        for name in times:
            mm.unload_all_models()
            clone = {"plain": lambda: model, "patch": lambda: apply_lora(model, lora, 1.0)[0],
                     "runtime": lambda: apply_runtime_lora(model, lora, [lora], 1.0)[0]}[name]()
            t0 = time.perf_counter()
            mm.load_models_gpu([clone])
            times[name].append(time.perf_counter() - t0)
    mm.unload_all_models()
    return {f"load_{k}_s": round(statistics.median(v), 4) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------
# full-size SD1.5-IP2P UNet, in child processes
# ---------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _comfy_version() -> str:
    import comfy_harness

    return ".".join(map(str, comfy_harness.comfyui_version()))


def full_prepare() -> dict:
    """Build (once) the seeded full-size UNet in ComfyUI's LDM keys and a seeded 'small' generator
    for its 160 default target layers."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from build_test_generator import _seed_b_head_
    from hywu_nodes.core import GeneratorConfig, HYWUGenerator, build_target_spec, save_generator, standard_condition_spec

    if FULL_UNET.is_file() and FULL_GENERATOR.is_file():
        return {"built": False}
    _import_comfy()
    import comfy.utils

    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=8, out_channels=4, cross_attention_dim=768)  # SD1.5 config + IP2P input
    spec = build_target_spec(unet, "sd15_ip2p")
    key_map = comfy.utils.unet_to_diffusers(dict(SD15_UNET_CONFIG))
    sd = {key_map[k]: v.to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    params = sum(p.numel() for p in unet.parameters())
    del unet
    save_file(sd, str(FULL_UNET))
    torch.manual_seed(1)
    gen = HYWUGenerator(GeneratorConfig.from_preset("small", rank=RANK, alpha=ALPHA), spec,
                        standard_condition_spec(768, 77, 4, RESOLUTION))
    _seed_b_head_(gen, 1, 0.02)
    save_generator(FULL_GENERATOR, gen, extra={"seeded": True, "builder": "bench/comfy_overhead.py"})
    return {"built": True, "seconds": round(time.perf_counter() - t0, 1), "unet_parameters": params}


def _full_model():
    _import_comfy()
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(FULL_UNET))


def _ip2p_inputs(batch=1, resolution=RESOLUTION):
    import torch

    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    concat = torch.randn(batch, 4, side, side, generator=g)
    pos = [[torch.randn(batch, 77, 768, generator=g), {"concat_latent_image": concat}]]
    neg = [[torch.randn(batch, 77, 768, generator=g), {"concat_latent_image": concat}]]
    noise = torch.randn(batch, 4, side, side, generator=g)
    return noise, pos, neg


def _sample(model, steps, cfg, inputs):
    import comfy.sample
    import torch

    noise, pos, neg = inputs
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, torch.zeros_like(noise),
                               disable_pbar=True)


def full_timing(a) -> dict:
    _import_comfy()
    import torch
    from safetensors.torch import save_file

    import comfy.model_management as mm

    from hywu_nodes.core import Condition
    from hywu_nodes.nodes.apply import apply_lora, apply_runtime_lora
    from hywu_nodes.nodes.generate import generate_loras
    from hywu_nodes.nodes.load_generator import load_generator_handle
    from hywu_nodes.nodes.types import EncodedCondition

    model = _full_model()
    handle = load_generator_handle(str(FULL_GENERATOR))
    spec = handle.condition_spec
    g = torch.Generator().manual_seed(2)
    cond = Condition({s.name: torch.randn(1, s.max_tokens, s.width, generator=g) for s in spec.sources})
    encoded = EncodedCondition(condition=cond, spec=spec, family=handle.family, batch_size=1, instruction="bench",
                               text=cond.tokens["text"], images=torch.zeros(1, RESOLUTION, RESOLUTION, 3))
    gen_s = []
    for _ in range(2):
        t0 = time.perf_counter()
        lora = generate_loras(handle, encoded)
        gen_s.append(time.perf_counter() - t0)
    save_file(dict(lora), str(FULL_LORA))
    n_params = sum(p.numel() for p in handle.patcher.model.parameters())
    del handle
    gc.collect()

    runtime_model = apply_runtime_lora(model, lora, [lora], 1.0)[0]
    clones = {"plain": model, "runtime": runtime_model, "patch": apply_lora(model, lora, 1.0)[0]}
    spent = _time_runtime_work(runtime_model)
    inputs = _ip2p_inputs()
    _sample(model, 1, a.cfg, inputs)  # warm-up: the first step pays one-time allocations
    step, load, lora_share = {k: [] for k in clones}, {k: [] for k in clones}, []
    for r in range(a.repeats):
        order = list(clones.items())
        for name, clone in order[r % 3:] + order[:r % 3]:  # interleaved, rotated; each load swaps patches
            t0 = time.perf_counter()
            mm.load_models_gpu([clone])
            load[name].append(time.perf_counter() - t0)
            spent[0] = 0.0
            t0 = time.perf_counter()
            _sample(clone, a.full_steps, a.cfg, inputs)
            seconds = time.perf_counter() - t0
            step[name].append(seconds / a.full_steps)
            if name == "runtime":
                lora_share.append(spent[0] / seconds)
    med = {k: statistics.median(v) for k, v in step.items()}
    gen_warm = min(gen_s)
    run20 = 20 * med["runtime"] + gen_warm
    return {
        "generator": {"preset": "small", "rank": RANK, "targets": len(lora) // 3, "parameters": n_params,
                      "condition_tokens": {s.name: s.max_tokens for s in spec.sources},
                      "forward_s_first_and_warm": [round(x, 3) for x in gen_s]},
        "step_s": {k: round(v, 3) for k, v in med.items()},
        "step_s_all": {k: [round(x, 3) for x in v] for k, v in step.items()},
        "load_s": {k: round(statistics.median(v), 3) for k, v in load.items()},
        "generator_share_of_one_step": round(gen_warm / med["plain"], 4),
        "generator_share_of_20_step_run": round(gen_warm / run20, 4),
        "runtime_lora_share_of_step_timed_inside": round(statistics.median(lora_share), 4),
        "runtime_step_vs_plain": round(med["runtime"] / med["plain"], 4),
        "patch_step_vs_plain": round(med["patch"] / med["plain"], 4),
        "patch_load_minus_plain_load_s": round(statistics.median(load["patch"]) - statistics.median(load["plain"]), 3),
    }


def full_memory(mode: str, a) -> dict:
    """Peak RSS of loading + sampling ``mode`` over the loaded plain model, in a fresh process."""
    _import_comfy()
    from safetensors.torch import load_file

    import comfy.model_management as mm

    from hywu_nodes.nodes.apply import apply_lora, apply_runtime_lora

    model = _full_model()
    mm.load_models_gpu([model])
    lora = load_file(str(FULL_LORA)) if mode != "plain" else None
    inputs = _ip2p_inputs(resolution=a.memory_resolution)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _rss_kib("VmRSS")
    clone = {"plain": lambda: model, "patch": lambda: apply_lora(model, lora, 1.0)[0],
             "runtime": lambda: apply_runtime_lora(model, lora, [lora], 1.0)[0]}[mode]()
    mm.load_models_gpu([clone])
    _sample(clone, 1, a.cfg, inputs)
    out = {"peak_over_loaded_plain_mib": round((_rss_kib("VmHWM") - base) / 1024, 1),
           "held_after_sampling_mib": round((_rss_kib("VmRSS") - base) / 1024, 1)}
    if mode == "patch":
        import comfy.utils

        keys = {k for k in clone.patches}
        out["targeted_weights_mib"] = round(sum(comfy.utils.get_attr(model.model, k).numel() * 4 for k in keys)
                                            / 2**20, 1)
    return out


def _child(args: list[str], a) -> dict:
    cmd = [sys.executable, __file__, "--_child", *args, "--threads", str(a.threads), "--repeats", str(a.full_repeats),
           "--cfg", str(a.cfg), "--full-steps", str(a.full_steps), "--memory-resolution", str(a.memory_resolution)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"bench child {args} failed (rc {r.returncode}):\n{r.stderr[-6000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def full_sections(a) -> dict:
    prepared = _child(["prepare"], a)
    timing = _child(["timing"], a)
    memory = {mode: _child(["memory", mode], a) for mode in ("plain", "patch", "runtime")}
    memory["resolution"] = a.memory_resolution
    memory["runtime_extra_over_plain_mib"] = round(memory["runtime"]["peak_over_loaded_plain_mib"]
                                                   - memory["plain"]["peak_over_loaded_plain_mib"], 1)
    memory["patch_extra_over_plain_mib"] = round(memory["patch"]["peak_over_loaded_plain_mib"]
                                                 - memory["plain"]["peak_over_loaded_plain_mib"], 1)
    memory["targeted_weights_mib"] = memory["patch"].pop("targeted_weights_mib")
    return {"model": "diffusers UNet2DConditionModel default config (SD1.5), in_channels 8, seeded random weights, "
                     "ComfyUI SD15_instructpix2pix", "prepare": prepared, "resolution": RESOLUTION,
            "cfg_batch": 2, "timing": timing, "memory": memory}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="measurements per case (median reported)")
    ap.add_argument("--full-repeats", type=int, default=3, help="full-size step measurements per case")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (server and children)")
    ap.add_argument("--skip-full", action="store_true", help="only the micro-base sections")
    ap.add_argument("--skip-micro", action="store_true", help="only the full-size sections")
    ap.add_argument("--full-steps", type=int, default=1, help="sampler steps per full-size timing")
    ap.add_argument("--memory-resolution", type=int, default=256,
                    help="image size of the memory runs (activations are the same in every mode)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    if a._child:
        what = a._child[0]
        result = full_prepare() if what == "prepare" else full_timing(a) if what == "timing" else full_memory(a._child[1], a)
        print(json.dumps(result))
        return
    t0 = time.time()
    out = {"setup": {"machine": f"{os.cpu_count()} CPU cores, shared with other jobs; load average (1 min) at start "
                                f"{os.getloadavg()[0]:.2f}", "device": "cpu", "torch_threads": a.threads,
                     "server": f"ComfyUI {_comfy_version()} main.py --cpu", "sampler": "euler / normal",
                     "micro": {"model": "micro SD1.5-InstructPix2Pix (seeded)", "generator": "hywu_micro_seeded "
                               "(tiny preset, rank 4, 40 targets)", "image": "64x64", "steps": a.steps, "cfg": a.cfg,
                               "repeats": a.repeats},
                     "time": "exec_s = execution_start..execution_success of the prompt on the server (medians)"}}
    if not a.skip_micro:
        out.update(micro_sections(a))
    if not a.skip_full:
        out["full_size"] = full_sections(a)
    out["setup"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    out["setup"]["bench_seconds"] = round(time.time() - t0, 1)
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
