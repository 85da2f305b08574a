"""Helpers of the per-family end-to-end tests (tests/test_family_*.py). Not a test module.

    train_generator(cfg) -> Path          # `python -m trainer.train` on cfg, cached under models/e2e/<name>-<hash>/
    trainer_edit(adapter, path, sources, instructions, steps, seed=0, strength=1.0) -> (B, H, W, 3) uint8
                                          # the trainer's own sampler with the file's generated LoRA (in-process)
    template(name) / swap_node(wf, class_type, new_class, **inputs) / bypass_node(wf, class_type, input_name)
                                          # the shipped API template with loaders swapped for test nodes
    run_images(server, wf, prefix) -> (B, H, W, 3) uint8   # POST /prompt, read the SaveImage PNGs
    psnr(a, b) -> float                   # dB on 8-bit images
    to_uint8(images01)                    # as SaveImage writes: 255 * x, clipped, truncated

The cache key covers the config (without its output folder) and the trainer's and core's source
files, so a changed trainer retrains; delete models/e2e/ to force it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
E2E_MODELS = REPO / "models" / "e2e"
API_DIR = REPO / "example_workflows" / "api"


def _source_digest() -> str:
    h = hashlib.sha256()
    for folder in ("trainer", "hywu_nodes/core"):
        for f in sorted((REPO / folder).rglob("*.py")):
            h.update(str(f.relative_to(REPO)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def train_generator(cfg, timeout: float = 600) -> Path:
    """Train ``cfg`` with ``python -m trainer.train --config <yaml>`` (a subprocess, as a user runs it) and
    return the generator file; reused when a run of the same config and code finished before."""
    import yaml

    data = cfg.to_dict()
    data.pop("output")
    key = hashlib.sha256((json.dumps(data, sort_keys=True) + _source_digest()).encode()).hexdigest()[:16]
    out = E2E_MODELS / f"{cfg.name}-{key}"
    path = out / f"{cfg.name}.safetensors"
    if path.is_file() and (out / "summary.json").is_file():
        return path
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump({**data, "output": str(out)}, sort_keys=False))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(config)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0 or not path.is_file():
        raise RuntimeError(f"python -m trainer.train failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return path


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) or (B, H, W, 3) floats in [0, 1] -> uint8 (B, H, W, 3), as SaveImage writes them."""
    x = images01.detach().float().cpu()
    if x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.movedim(1, -1)
    return np.clip(255.0 * x.numpy(), 0, 255).astype(np.uint8)


@torch.no_grad()
def trainer_edit(adapter, generator_path, sources: torch.Tensor, instructions: list[str], steps: int, seed: int = 0,
                 strength: float = 1.0, **sample_options) -> np.ndarray:
    """The trainer's own edit: condition -> the file's generator -> per-sample LoRA (scaled by ``strength``)
    in the base forward -> the family's sampler (``sample_options``: e.g. Qwen's cfg / shift / cfg_norm).
    ``sources`` (B, 3, H, W) in [0, 1]."""
    from hywu_nodes.core import GeneratedLoRA, load_generator, lora_patched

    generator, _ = load_generator(generator_path)
    generator.eval()
    lora = generator(adapter.encode_condition(sources, instructions))
    lora = GeneratedLoRA(lora.weights, lora.scale * strength)
    with lora_patched(adapter.denoiser, lora.to(adapter.device, adapter.dtype)):
        return to_uint8(adapter.sample(sources, instructions, steps, seed=seed, **sample_options))


def template(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def node_id(wf: dict, class_type: str) -> str:
    ids = [k for k, v in wf.items() if v["class_type"] == class_type]
    if len(ids) != 1:
        raise KeyError(f"the graph has {len(ids)} {class_type} nodes, expected one")
    return ids[0]


def swap_node(wf: dict, class_type: str, new_class: str, **inputs) -> str:
    """Replace the one ``class_type`` node by ``new_class`` with ``inputs`` (its outputs keep their links)."""
    k = node_id(wf, class_type)
    wf[k] = {"class_type": new_class, "inputs": inputs, "_meta": {"title": f"{new_class} (test, for {class_type})"}}
    return k


def bypass_node(wf: dict, class_type: str, input_name: str) -> None:
    """Remove the one ``class_type`` node; whatever read its output 0 reads its ``input_name`` link instead."""
    k = node_id(wf, class_type)
    src = wf.pop(k)["inputs"][input_name]
    for node in wf.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == k:
                node["inputs"][name] = copy.deepcopy(src)


def set_inputs(wf: dict, class_type: str, **inputs) -> None:
    wf[node_id(wf, class_type)]["inputs"].update(inputs)


def run_images(server, wf: dict, prefix: str, timeout: float = 300) -> np.ndarray:
    """Run ``wf`` (its SaveImage prefix set to ``prefix``) and return the saved batch, uint8 (B, H, W, 3)."""
    from PIL import Image

    wf = copy.deepcopy(wf)
    set_inputs(wf, "SaveImage", filename_prefix=prefix)
    entry = server.run(wf, timeout=timeout)
    paths = sorted(server.output_images(entry))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
