"""Run a frozen base model with a batch of generated LoRAs, one per sample.

For a targeted linear layer ``y = W x`` the patched output for sample ``b`` is
``y = W x + s * (x A_b^T) B_b^T`` with ``s = strength * alpha / rank``. The base weights are
never touched (forward hooks add the low-rank term), so the same base serves every request and
gradients flow into A and B only.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .tokenizer import LoRAWeights


@dataclass
class GeneratedLoRA:
    """A batch of LoRAs: ``weights[name] = (A (batch, r, d_in), B (batch, d_out, r))``."""

    weights: LoRAWeights
    scale: float  # alpha / rank

    @property
    def batch_size(self) -> int:
        return next(iter(self.weights.values()))[0].shape[0]

    @property
    def rank(self) -> int:
        return next(iter(self.weights.values()))[0].shape[1]

    def select(self, index) -> "GeneratedLoRA":
        """LoRA ``index`` (an int: a batch of one) or the LoRAs of a slice."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return GeneratedLoRA({k: (a[index], b[index]) for k, (a, b) in self.weights.items()}, self.scale)

    def to(self, device=None, dtype=None) -> "GeneratedLoRA":
        return GeneratedLoRA(
            {k: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)) for k, (a, b) in self.weights.items()},
            self.scale,
        )


def concat_ranks(loras: list[GeneratedLoRA]) -> GeneratedLoRA:
    """LoRAs of one batch size and scale joined along the rank: each sample's update is the sum
    of theirs (two LoRAs applied one after the other, at strength 1 each)."""
    scales = {lo.scale for lo in loras}
    if len(scales) != 1:
        raise ValueError(f"LoRAs joined along the rank need one alpha / rank, got {sorted(scales)}")
    return GeneratedLoRA({k: (torch.cat([lo.weights[k][0] for lo in loras], 1),
                              torch.cat([lo.weights[k][1] for lo in loras], 2)) for k in loras[0].weights},
                         scales.pop())


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, sample_to_lora=None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The low-rank term for x (batch, ..., d_in); a (n, r, d_in), b (n, d_out, r).

    Sample ``i`` uses LoRA ``sample_to_lora[i]``, by default ``i % n``: a batch duplicated for
    classifier-free guidance (``[uncond, cond]`` or more copies) keeps each sample's LoRA.
    With ``out`` (a contiguous (batch, ..., d_out) tensor of x's dtype, e.g. the layer's own
    output) the term is added into it in place, saving a pass over the output; ``out`` is returned.
    """
    a, b = a.to(x.dtype), b.to(x.dtype)
    n, batch, d_out = a.shape[0], x.shape[0], b.shape[1]
    if n == 1 and sample_to_lora is None:
        h = x.reshape(-1, x.shape[-1]) @ a[0].t()
        if out is not None:
            out.view(-1, d_out).addmm_(h, b[0].t(), alpha=scale)
            return out
        delta = (h @ b[0].t()).reshape(*x.shape[:-1], d_out)
    else:
        if sample_to_lora is None:
            if batch % n:
                raise ValueError(f"batch of {batch} samples does not divide into {n} generated LoRAs")
            sample_to_lora = torch.arange(batch, device=x.device) % n
        h = torch.bmm(x.reshape(batch, -1, x.shape[-1]), a[sample_to_lora].transpose(1, 2))
        bt = b[sample_to_lora].transpose(1, 2)
        if out is not None:
            out.view(batch, -1, d_out).baddbmm_(h, bt, alpha=scale)
            return out
        delta = torch.bmm(h, bt).reshape(*x.shape[:-1], d_out)
    return delta if scale == 1.0 else delta * scale  # callers that fold the scale into b skip a pass


@contextmanager
def lora_patched(model: nn.Module, lora: GeneratedLoRA, strength: float = 1.0, sample_to_lora: torch.Tensor | None = None):
    """Inside the ``with`` block, ``model``'s forward includes the per-sample LoRA."""
    modules = dict(model.named_modules())
    scale = lora.scale * strength
    handles = []
    try:
        for name, (a, b) in lora.weights.items():
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise KeyError(f"generated LoRA targets '{name}', which is not a linear layer of this model")

            def hook(mod, args, output, a=a, b=b):
                return output + lora_delta(args[0], a, b, scale, sample_to_lora)

            handles.append(module.register_forward_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def merge_lora_(model: nn.Module, lora: GeneratedLoRA, index: int = 0, strength: float = 1.0) -> nn.Module:
    """Add sample ``index``'s LoRA into the weights of ``model`` in place (pass a copy)."""
    modules = dict(model.named_modules())
    for name, (a, b) in lora.weights.items():
        w = modules[name].weight
        w += (strength * lora.scale * (b[index].float() @ a[index].float())).to(w.dtype)
    return model
