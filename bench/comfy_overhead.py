#!/usr/bin/env python
"""Cost of HY-WU inside ComfyUI on the micro model: one run, same steps and seed.

Compares the HY-WU demo graph (Load Generator -> Condition Encode -> Generate LoRA -> Apply ->
InstructPixToPix -> KSampler) with the same graph using a static LoRA file through core
LoraLoaderModelOnly (and CLIP Text Encode for the instruction), on
  * a first run (fresh ComfyUI caches, models unloaded: POST /free), and
  * a rerun with only the instruction changed (ComfyUI caching on),
and reports the share of the HY-WU graph's time spent in Generate LoRA (from the node's log
line) and in patching (HY-WU Apply's add_patches, from its log line, plus the weight patching
ComfyUI does when it loads the patched model: measured in-process on the same checkpoint).
Prints one JSON object.

    .venv/bin/python bench/comfy_overhead.py [--steps 4] [--seed 0] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests", REPO / "scripts"):
    sys.path.insert(0, str(p))

import comfy_harness  # noqa: E402
import hywu_graphs as g  # noqa: E402

GEN_RE = re.compile(r"HY-WU: generated \d+ LoRA\(s\) .* in ([0-9.]+) s")
APPLY_RE = re.compile(r"HY-WU: applied LoRA .* in ([0-9.]+) s")
LOAD_RE = re.compile(r"HY-WU: loaded generator .* in ([0-9.]+) s")
ENCODE_RE = re.compile(r"HY-WU: encoded the condition .* in ([0-9.]+) s")
INSTRUCTIONS = ("make it a snowy winter scene", "turn it into an oil painting")


def _exec_seconds(entry) -> float:
    ts = {name: data.get("timestamp") for name, data in entry["status"]["messages"]}
    return (ts["execution_success"] - ts["execution_start"]) / 1000.0


def _free(srv):
    import requests

    requests.post(srv.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=30)
    time.sleep(1.5)


def _timed(srv, wf) -> dict:
    n0 = len(srv.log_path.read_text(errors="replace"))
    t0 = time.perf_counter()
    entry = srv.run(wf, timeout=600)
    wall = time.perf_counter() - t0
    assert srv.output_images(entry)
    time.sleep(0.3)
    log = srv.log_path.read_text(errors="replace")[n0:]
    return {"wall_s": round(wall, 3), "exec_s": round(_exec_seconds(entry), 3),
            "generate_lora_s": round(sum(float(x) for x in GEN_RE.findall(log)), 4),
            "apply_node_s": round(sum(float(x) for x in APPLY_RE.findall(log)), 4),
            "load_generator_s": round(sum(float(x) for x in LOAD_RE.findall(log)), 4),
            "condition_encode_s": round(sum(float(x) for x in ENCODE_RE.findall(log)), 4),
            "server_log": [l for l in log.splitlines() if l.startswith(("HY-WU", "Prompt executed", "Requested"))]}


def _median_row(rows: list[dict]) -> dict:
    """Per-field median over repeats (the server log of the median run is kept)."""
    out = {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0] if k != "server_log"}
    out["exec_s_all"] = [r["exec_s"] for r in rows]
    mid = sorted(rows, key=lambda r: r["exec_s"])[len(rows) // 2]
    out["server_log"] = mid["server_log"]
    return out


def _patch_seconds_inprocess(checkpoint, lora: dict, repeats=3) -> dict:
    """Time ComfyUI's load of the model with and without the LoRA's patches (weights patched on load)."""
    comfy_harness.import_comfy(extra_modules=("comfy.sd", "comfy.utils", "comfy.model_management", "folder_paths",
                                              "comfy.lora", "comfy_api.latest"))
    import comfy.model_management as mm
    import comfy.sd
    from hywu_nodes.nodes.apply import apply_lora

    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)
    plain, patched = [], []
    for _ in range(repeats):
        mm.unload_all_models()
        t0 = time.perf_counter()
        mm.load_models_gpu([model])
        plain.append(time.perf_counter() - t0)
        mm.unload_all_models()
        clone, _ = apply_lora(model, lora, 1.0)
        t0 = time.perf_counter()
        mm.load_models_gpu([clone])
        patched.append(time.perf_counter() - t0)
        mm.unload_all_models()
    return {"load_plain_s": round(statistics.median(plain), 4), "load_patched_s": round(statistics.median(patched), 4),
            "patch_weights_s": round(max(0.0, statistics.median(patched) - statistics.median(plain)), 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="measurements per case (median reported)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)

    import build_micro_base
    import build_test_generator

    diffusers_dir, ckpt = build_micro_base.ensure_micro_base()
    gens = build_test_generator.build_test_generators(base_dir=diffusers_dir)
    generator = Path(gens["seeded"]).name

    # --verbose DEBUG: the nodes' per-prompt timing lines parsed below are DEBUG lines
    with comfy_harness.ComfyServer(checkpoints=[ckpt], extra_models={"hywu": [gens["seeded"]]},
                                   extra_args=["--verbose", "DEBUG"]) as srv:
        srv.put_input(g.make_test_image(0), g.load_api("hywu_demo")["2"]["inputs"]["image"])
        # the static LoRA: one generated LoRA saved with core Save LoRA (output/loras is a 'loras' folder)
        srv.run(g.lora_only("a fixed style", "loras/hywu_bench_static", generator=generator), timeout=600)
        static_file = sorted((srv.output_dir / "loras").glob("hywu_bench_static_*.safetensors"))[-1]

        def hywu(instr):
            return g.demo(instruction=instr, seed=a.seed, steps=a.steps, generator=generator, prefix="bench_hywu")

        def static(instr):
            return g.with_static_lora(g.plain(instruction=instr, seed=a.seed, steps=a.steps, prefix="bench_static"),
                                      static_file.name)

        # warm-up (imports, first kernels), then every measured first run starts from /free
        srv.run(static("warm up"), timeout=600)
        srv.run(hywu("warm up"), timeout=600)
        res = {"static_lora": {"first_run": [], "rerun_instruction_changed": []},
               "hywu": {"first_run": [], "rerun_instruction_changed": []}}
        for _ in range(a.repeats):  # interleaved, so both graphs see the same machine load
            for name, make in (("static_lora", static), ("hywu", hywu)):
                _free(srv)
                res[name]["first_run"].append(_timed(srv, make(INSTRUCTIONS[0])))
                res[name]["rerun_instruction_changed"].append(_timed(srv, make(INSTRUCTIONS[1])))
        for name in res:
            for run, rows in res[name].items():
                res[name][run] = _median_row(rows)
        from safetensors.torch import load_file

        static_lora = load_file(str(static_file))  # the server's temp dir goes away with it
    patch = _patch_seconds_inprocess(ckpt, static_lora)

    h, s = res["hywu"], res["static_lora"]
    out = {
        "setup": {"model": "micro SD1.5-InstructPix2Pix (models/checkpoints/hywu_micro_sd15_ip2p.safetensors)",
                  "generator": generator, "image": "64x64", "steps": a.steps, "seed": a.seed, "sampler": "euler", "repeats": a.repeats,
                  "device": "cpu", "cpu_threads": os.cpu_count(), "server": "ComfyUI 0.3.75 main.py --cpu",
                  "time": "exec_s = execution_start..execution_success of the prompt on the server; median of "
                          "`repeats` interleaved measurements, first runs after POST /free",
                  "load_average_1m": round(os.getloadavg()[0], 2)},
        "static_lora": s,
        "hywu": h,
        "patch_inprocess": patch,
    }
    for run in ("first_run", "rerun_instruction_changed"):
        hs, ss = h[run]["exec_s"], s[run]["exec_s"]
        patching = h[run]["apply_node_s"] + patch["patch_weights_s"]
        out[f"summary_{run}"] = {
            "hywu_s": hs, "static_lora_s": ss, "overhead_s": round(hs - ss, 3), "ratio": round(hs / ss, 3),
            "share_generate_lora": round(h[run]["generate_lora_s"] / hs, 4),
            "share_patching": round(patching / hs, 4),
        }
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
