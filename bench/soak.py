#!/usr/bin/env python
"""Soak: many prompts through one real ComfyUI server, then an interrupt mid-run.

Runs ``--prompts`` (200) HY-WU prompts on the micro SD1.5-InstructPix2Pix checkpoint with the
seeded test generator (the demo graph, tests/hywu_graphs.py), each with its own seed and
instruction (the synthetic world's phrasings, numbered so no two are alike and nothing is
served from ComfyUI's cache), interleaved with a plain graph (no HY-WU) every ``--plain-every``
prompts as the same-run baseline. Halfway through, a long prompt is interrupted (POST
/interrupt) while it samples, and the next prompt must succeed. Prints one JSON object:
latency p50/p95 (server execution time and wall time) with the ratio to the plain graph, the
server's RSS at start (after one warm-up prompt), after 50 and after all prompts, and the
interrupt's outcome.

    .venv/bin/python bench/soak.py [--prompts 200] [--steps 2] [--plain-every 10] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests", REPO / "scripts"):
    sys.path.insert(0, str(p))

import comfy_harness  # noqa: E402
import hywu_graphs as g  # noqa: E402

MB = 1024 * 1024


def _instructions(n: int) -> list[str]:
    from trainer.synthetic import PHRASINGS

    words = [w for task in PHRASINGS.values() for kind in ("train", "heldout") for w in task[kind]]
    return [f"{words[i % len(words)]} (variant {i})" for i in range(n)]


def _pct(values, q) -> float:
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 4)


def _timed(srv, wf) -> dict:
    t0 = time.perf_counter()
    entry = srv.run(wf, timeout=600)
    wall = time.perf_counter() - t0
    assert srv.output_images(entry), "no image saved"
    return {"exec_s": srv.execution_seconds(entry), "wall_s": wall}


def _interrupt(srv, steps: int) -> dict:
    """Queue a long prompt, interrupt it while it runs, then check the next prompt succeeds."""
    pid = srv.queue(g.demo(instruction="interrupt me", seed=123456, steps=steps, prefix="soak_interrupt"))
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is executing
        if requests.get(srv.url + "/queue", timeout=10).json().get("queue_running"):
            break
        time.sleep(0.05)
    time.sleep(1.0)  # well inside sampling
    t0 = time.perf_counter()
    requests.post(srv.url + "/interrupt", json={}, timeout=10)
    entry = srv.wait(pid, timeout=300, raise_on_error=False)
    stopped = time.perf_counter() - t0
    names = [name for name, _ in entry["status"]["messages"]]
    after = srv.run(g.demo(instruction="after the interrupt", seed=654321, steps=2, prefix="soak_after"), timeout=600)
    return {"interrupted": "execution_interrupted" in names, "stopped_after_s": round(stopped, 3),
            "long_prompt_steps": steps, "next_prompt_ok": after["status"]["status_str"] == "success"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--steps", type=int, default=2, help="sampler steps per prompt")
    ap.add_argument("--plain-every", type=int, default=10, help="one plain-graph prompt after every N HY-WU prompts")
    ap.add_argument("--interrupt-steps", type=int, default=400, help="sampler steps of the interrupted prompt")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)

    import build_micro_base
    import build_test_generator

    diffusers_dir, ckpt = build_micro_base.ensure_micro_base()
    gens = build_test_generator.build_test_generators(base_dir=diffusers_dir)
    generator = Path(gens["seeded"]).name
    instructions = _instructions(a.prompts)
    load0 = os.getloadavg()[0]
    t_start = time.time()
    with comfy_harness.ComfyServer(checkpoints=[ckpt], extra_models={"hywu": [gens["seeded"]]}) as srv:
        def hywu(i):
            return g.demo(instruction=instructions[i], seed=i, steps=a.steps, generator=generator, prefix="soak")

        _timed(srv, hywu(0))  # warm-up: loads checkpoint and generator
        rss = {"start_mb": round(srv.rss() / MB, 1)}
        log_start = len(srv.log_tail(10 ** 9))  # ComfyUI's start-up tracebacks (optional modules) are not counted
        rows, plain = [], []
        interrupt = None
        for i in range(a.prompts):
            rows.append(_timed(srv, hywu(i)))
            if (i + 1) % a.plain_every == 0:
                plain.append(_timed(srv, g.plain(instruction=instructions[i], seed=i, steps=a.steps,
                                                  prefix="soak_plain")))
            if i + 1 == 50:
                rss["after_50_mb"] = round(srv.rss() / MB, 1)
            if i + 1 == a.prompts // 2:
                interrupt = _interrupt(srv, a.interrupt_steps)
        rss[f"after_{a.prompts}_mb"] = round(srv.rss() / MB, 1)
        tracebacks = srv.log_tail(10 ** 9)[log_start:].count("Traceback (most recent call last)")
    hy_exec, pl_exec = [r["exec_s"] for r in rows], [r["exec_s"] for r in plain]
    hy_wall = [r["wall_s"] for r in rows]
    out = {
        "setup": {"model": "micro SD1.5-InstructPix2Pix (seeded), seeded HY-WU generator", "image": "32x32 demo input",
                  "graph": "example_workflows/api/hywu_demo.json with the test pair", "steps": a.steps,
                  "prompts": a.prompts, "plain_baseline_prompts": len(plain), "server": f"ComfyUI {'.'.join(map(str, comfy_harness.comfyui_version()))} main.py --cpu",
                  "cpu_threads": os.cpu_count(), "load_average_1m_start": round(load0, 2),
                  "load_average_1m_end": round(os.getloadavg()[0], 2), "seconds": round(time.time() - t_start, 1),
                  "note": "exec_s = execution_start..execution_success on the server; timings are noisy on a shared "
                          "machine, compare the ratios"},
        "latency_s": {"hywu_exec_p50": _pct(hy_exec, 50), "hywu_exec_p95": _pct(hy_exec, 95),
                      "hywu_wall_p50": _pct(hy_wall, 50), "hywu_wall_p95": _pct(hy_wall, 95),
                      "plain_exec_p50": _pct(pl_exec, 50), "plain_exec_p95": _pct(pl_exec, 95),
                      "ratio_p50_hywu_to_plain": round(_pct(hy_exec, 50) / _pct(pl_exec, 50), 3),
                      "ratio_p95_hywu_to_plain": round(_pct(hy_exec, 95) / _pct(pl_exec, 95), 3)},
        "rss": {**rss, "growth_50_to_end_mb": round(rss[f"after_{a.prompts}_mb"] - rss["after_50_mb"], 1),
                "growth_start_to_end_mb": round(rss[f"after_{a.prompts}_mb"] - rss["start_mb"], 1)},
        "interrupt": interrupt,
        "tracebacks_after_warmup": tracebacks,
    }
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
