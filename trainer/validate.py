"""Validation on held-out rows: the loss with and without the trained LoRA, and a labelled grid
(one row per example: source | target | base edit | edit with the generated LoRA, the
instruction under it); previews on the user's own images (train.samples) without the target."""
from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from hywu_nodes.core import GeneratedLoRA, lora_patched


def to_pil_row(images: list[torch.Tensor]) -> Image.Image:
    row = torch.cat([im.detach().float().cpu().clamp(0, 1) for im in images], dim=-1)  # (3, H, k*W)
    return Image.fromarray((row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@torch.no_grad()
def validation_grid(adapter, method, val_batches: dict | list[dict], steps: int, path: str, seed: int = 0, write: bool = True,
                    chain=None, with_target: bool = True) -> str:
    """Sample the grid; ``write=False`` on the other processes of a sharded run (they take part
    in the generator's forward but write nothing). ``val_batches``: one batch, or one per image
    size (bucketed runs). ``chain`` (a trainer.edits.Chaining, HY-WU runs only): rows with edits
    get the sum of their edits' LoRAs. ``with_target=False``: previews on images without a target
    (train.samples): source | base | generated LoRA."""
    rows, captions = [], []
    for val_batch in ([val_batches] if isinstance(val_batches, dict) else val_batches):
        src, tgt, text = val_batch["source"], val_batch["target"], val_batch["instruction"]
        base, edited = _edits(adapter, method, val_batch, steps, seed, chain)
        rows += [[s, t, b, e] if with_target else [s, b, e] for s, t, b, e in zip(src, tgt, base, edited)]
        captions += text
    if not write:
        return path
    grid = labelled_grid(rows, captions, COLUMNS if with_target else PREVIEW_COLUMNS)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    from .state import publish

    publish(path)
    return path


def _edits(adapter, method, val_batch: dict, steps: int, seed: int, chain) -> tuple[torch.Tensor, torch.Tensor]:
    """(the base's edits, the edits with the generated LoRA) of one batch."""
    src, text = val_batch["source"], val_batch["instruction"]
    base = adapter.sample(src, text, steps, seed=seed)
    module = method.module
    was_training = module.training
    module.eval()
    try:
        plan = chain.plan(val_batch) if chain else None
        cond = plan.image_condition(adapter, src) if plan else adapter.encode_condition(src, text)
        lora, s2l = method.lora(module, cond.to(adapter.device), val_batch["task_id"].clamp(min=0).to(adapter.device))
        lora = plan.chain(lora) if plan else lora
        if s2l is not None:  # per-task LoRAs: gather each sample's own, then i % b covers CFG copies
            lora = GeneratedLoRA({k: (a[s2l], b[s2l]) for k, (a, b) in lora.weights.items()}, lora.scale)
        with lora_patched(adapter.denoiser, lora.to(adapter.device, adapter.dtype)):
            edited = adapter.sample(src, text, steps, seed=seed)
    finally:
        module.train(was_training)
    return base, edited


COLUMNS = ("source", "target", "base (no LoRA)", "generated LoRA")
PREVIEW_COLUMNS = ("your image", "base (no LoRA)", "generated LoRA")
MIN_CELL = 128  # small training images are enlarged (nearest) so the labels fit


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def labelled_grid(rows: list[list[torch.Tensor]], captions: list[str], columns=COLUMNS) -> Image.Image:
    """Images (3, H, W) in [0, 1] per row, a header with the column names and each row's caption. Rows
    of several sizes (bucketed runs) share the largest cell, each image centred in it on white."""
    h, w = max(im.shape[-2] for r in rows for im in r), max(im.shape[-1] for r in rows for im in r)
    k = max(1, -(-MIN_CELL // max(h, w)))  # integer zoom
    cw, ch = w * k, h * k
    font = ImageFont.load_default()
    line = 16
    grid = Image.new("RGB", (cw * len(columns), line + len(rows) * (ch + line)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((c * cw + 3, 2), _fit(draw, name, font, cw - 6), fill="black", font=font)
    y = line
    for imgs, caption in zip(rows, captions):
        for c, im in enumerate(imgs):
            ih, iw = im.shape[-2:]
            cell = to_pil_row([im]).resize((iw * k, ih * k), Image.NEAREST)
            grid.paste(cell, (c * cw + (w - iw) * k // 2, y + (h - ih) * k // 2))
        draw.text((3, y + ch + 2), _fit(draw, caption, font, grid.width - 6), fill="black", font=font)
        y += ch + line
    return grid


VAL_DRAWS = 4  # noise/timestep draws per held-out row: the loss of a few rows is noisy
VAL_STEP = 1_000_000_007  # a fixed "step" for the noise of validation (the same at every validation)


class ValidationLoss:
    """The denoising loss on held-out rows at fixed noise and timesteps (no CFG dropout), with the
    trained LoRA and for the frozen base alone (computed once, at the first validation: the base
    does not change, and the training steps before it stay exactly as without validation)."""

    def __init__(self, adapter, batches: list[dict], task_index: dict, autocast=nullcontext, chain=None):
        """``chain`` (a trainer.edits.Chaining, HY-WU runs only): rows with edits are scored with the
        sum of their edits' LoRAs."""
        self.adapter, self.autocast = adapter, autocast
        self.preps, self.rows = [], 0
        old = adapter.drop_text, adapter.drop_image
        adapter.drop_text = adapter.drop_image = 0.0
        try:
            for batch in batches:
                b = len(batch["instruction"])
                keys = [(self.rows + j) * VAL_DRAWS + d for d in range(VAL_DRAWS) for j in range(b)]
                enc = adapter.encode(batch)
                task_id = torch.tensor([task_index.get(t, 0) for t in batch["task"]], dtype=torch.long)
                prep = adapter.prepare_encoded(enc, VAL_STEP, keys)
                plan = chain.plan(batch) if chain else None
                self.preps.append((prep, task_id, plan, plan.condition(adapter, enc) if plan else None))
                self.rows += b
        finally:
            adapter.drop_text, adapter.drop_image = old
        self.base: float | None = None

    def base_loss(self) -> float:
        if self.base is None:
            self.base = self._loss(None, None)
        return self.base

    @torch.no_grad()
    def _loss(self, method, module) -> float:
        from hywu_nodes.core import lora_patched

        total, n = 0.0, 0
        for prep, task_id, plan, edit_cond in self.preps:
            with self.autocast():
                if method is None:
                    loss = self.adapter.loss(prep)
                else:
                    cond = prep["condition"] if plan is None else edit_cond
                    lora, s2l = method.lora(module, cond.to(self.adapter.device), task_id.to(self.adapter.device), VAL_DRAWS)
                    lora = plan.chain(lora) if plan else lora
                    with lora_patched(self.adapter.denoiser, lora, sample_to_lora=s2l):
                        loss = self.adapter.loss(prep)
            total += loss.float().sum().item()
            n += loss.numel()
        return total / max(n, 1)

    def __call__(self, method, module) -> float:
        self.base_loss()
        was = module.training
        module.eval()
        try:
            return self._loss(method, module)
        finally:
            module.train(was)
