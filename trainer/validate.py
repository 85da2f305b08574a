"""Validation grid: one row per fixed validation example, columns
source | target | base edit | edit with the trained LoRA."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from hywu_nodes.core import GeneratedLoRA, lora_patched


def to_pil_row(images: list[torch.Tensor]) -> Image.Image:
    row = torch.cat([im.clamp(0, 1) for im in images], dim=-1)  # (3, H, k*W)
    return Image.fromarray((row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@torch.no_grad()
def validation_grid(adapter, method, val_batch: dict, steps: int, path: str, seed: int = 0, write: bool = True) -> str:
    """Sample the grid; ``write=False`` on the other processes of a sharded run (they take part
    in the generator's forward but write nothing)."""
    src, tgt, text = val_batch["source"], val_batch["target"], val_batch["instruction"]
    base = adapter.sample(src, text, steps, seed=seed)
    module = method.module
    was_training = module.training
    module.eval()
    try:
        cond = adapter.encode_condition(src, text)
        lora, s2l = method.lora(module, cond.to(adapter.device), val_batch["task_id"].clamp(min=0).to(adapter.device))
        if s2l is not None:  # per-task LoRAs: gather each sample's own, then i % b covers CFG copies
            lora = GeneratedLoRA({k: (a[s2l], b[s2l]) for k, (a, b) in lora.weights.items()}, lora.scale)
        with lora_patched(adapter.denoiser, lora.to(adapter.device, adapter.dtype)):
            edited = adapter.sample(src, text, steps, seed=seed)
    finally:
        module.train(was_training)
    if not write:
        return path
    rows = [to_pil_row([s, t, b, e]) for s, t, b, e in zip(src, tgt, base, edited)]
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return path
