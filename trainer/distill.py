"""``data.replay.distill``: while a generator is extended (``--init-from``), keep the LoRAs it
writes for the replayed old rows equal to the ones the parent file wrote for them.

Replay alone shows the old edits to the diffusion loss in a small share of each batch, through
noisy targets; the generator still drifts on them while it learns the new edits. This term is a
direct, low-noise signal on the same rows (learning without forgetting, on the weights the
generator writes): for every target layer, random probe inputs x go through the generated update
and through the parent's,

    loss = sum over layers |dW x - dW_parent x|^2 / sum over layers |dW_parent x|^2

on the replay rows only (dW = scale * B A, the shared rank included): the relative change of the
updates the generator writes for the old rows, whatever their scale. The parent is a frozen copy
of the file's generator, never updated.
"""
from __future__ import annotations

import copy

import torch

from hywu_nodes.core import Condition, GeneratedLoRA

PROBES = 4  # random input vectors per layer and step


class ReplayDistillation:
    def __init__(self, generator: torch.nn.Module, weight: float, seed: int):
        self.parent = copy.deepcopy(generator).eval().requires_grad_(False)
        self.weight, self.seed = float(weight), int(seed)

    def to(self, device) -> "ReplayDistillation":
        self.parent.to(device)
        return self

    def loss(self, lora: GeneratedLoRA, cond: Condition, replay: torch.Tensor, step: int) -> torch.Tensor | None:
        """The weighted term for one batch (``replay``: bool per example), or None without replay rows."""
        if not bool(replay.any()):
            return None
        rows = replay.nonzero().squeeze(1).to(cond.tokens[next(iter(cond.tokens))].device)
        sub = Condition({k: v[rows] for k, v in cond.tokens.items()}, {k: v[rows] for k, v in cond.masks.items()})
        with torch.no_grad():
            ref = self.parent(sub)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # same probes on every process
        change, size = [], []
        for name, (a, b) in lora.weights.items():
            a, b = a[rows], b[rows]
            ra, rb = ref.weights[name]
            x = torch.randn(a.shape[-1], PROBES, generator=g).to(a.device, a.dtype)
            y = lora.scale * (b @ (a @ x))
            y_ref = ref.scale * (rb.to(a.dtype) @ (ra.to(a.dtype) @ x))
            change.append((y - y_ref).pow(2).sum())
            size.append(y_ref.pow(2).sum())
        return self.weight * torch.stack(change).sum() / torch.stack(size).sum().clamp_min(1e-12)
