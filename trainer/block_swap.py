"""Block swap (``train.blocks_to_swap``): the last N blocks of the frozen denoiser live in CPU memory (pinned on
CUDA) and are copied to the accelerator just before they run, the next one on a side stream while the current
one computes, in the forward pass and again in the backward pass.

How a block moves: each of its tensors keeps a host copy; ``fetch`` points the tensor at an accelerator copy,
``release`` points it back at the host copy (``tensor.data``), so the device copy is freed once nothing else holds
it. Autograd keeps the weights it needs for backward as these same tensors, so a released block is fetched again
before its backward runs (a hook on the block's output gradient) and released after it (a hook on its input
gradient). Under the base's activation checkpointing (non-reentrant, diffusers' default) the block is recomputed
inside that window, so it stays fetched for the recompute and its backward. The blocks are the base's FSDP units
(trainer/sharding.py): DiT transformer blocks, UNet down/up blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from .sharding import shard_units


class BlockSwap:
    def __init__(self, denoiser: nn.Module, n: int, device: torch.device, poison_released: bool = False):
        """``poison_released`` (tests): a released block's tensors point at NaN, so any use of a block that is not
        fetched shows up in the result."""
        blocks = shard_units(denoiser)
        if not 0 < n <= len(blocks):
            raise ValueError(f"train.blocks_to_swap is {n}; this base has {len(blocks)} blocks to swap (1 to {len(blocks)})")
        self.blocks = blocks[len(blocks) - n:]
        self.device, self.cuda = device, device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.host: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per block: (tensor, its host copy)
        self.parked: list[list[torch.Tensor]] = []  # what a released tensor points at
        self.ready: dict[int, torch.cuda.Event | None] = {}  # fetched blocks (and the copy's event on CUDA)
        self.pinned: set[int] = set()  # blocks between their output gradient and their input gradients
        self.waiting: dict[int, int] = {}  # per pinned block: input gradients still to come
        self.fetches = 0
        self.handles = []
        swapped = set()
        for i, block in enumerate(self.blocks):
            pairs = []
            for t in [*block.parameters(), *block.buffers()]:
                host = t.detach() if t.device.type == "cpu" else t.detach().to("cpu")
                pairs.append((t, host.pin_memory() if self.cuda else host))
                swapped.add(id(t))
            self.host.append(pairs)
            self.parked.append([torch.full_like(h, float("nan")) if poison_released and h.is_floating_point() else h
                                for _, h in pairs])
            self.handles += [block.register_forward_pre_hook(lambda m, a, kw, i=i: self._before(i), with_kwargs=True),
                             block.register_forward_hook(lambda m, a, kw, out, i=i: self._after(i, [*a, *kw.values()], out),
                                                         with_kwargs=True)]
            self.release(i)
        for t in [*denoiser.parameters(), *denoiser.buffers()]:  # the rest of the denoiser lives on the accelerator
            if id(t) not in swapped:
                t.data = t.data.to(device)

    def bytes(self) -> int:
        return sum(h.numel() * h.element_size() for pairs in self.host for _, h in pairs)

    # --- moving ---------------------------------------------------------------------------------
    def _copy(self, i: int) -> None:
        """Start copying block ``i`` to the accelerator (on the side stream on CUDA)."""
        if i in self.ready or not 0 <= i < len(self.blocks):
            return
        self.fetches += 1
        if self.cuda:
            with torch.cuda.stream(self.stream):
                copies = [h.to(self.device, non_blocking=True) for _, h in self.host[i]]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            copies, event = [h if self.device.type == "cpu" else h.to(self.device) for _, h in self.host[i]], None
        for (t, _), c in zip(self.host[i], copies):
            t.data = c
        self.ready[i] = event

    def fetch(self, i: int) -> None:
        """Block ``i`` on the accelerator, ready for use on the current stream."""
        self._copy(i)
        event = self.ready[i]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t, _ in self.host[i]:
                t.record_stream(torch.cuda.current_stream(self.device))

    def release(self, i: int) -> None:
        for (t, _), parked in zip(self.host[i], self.parked[i]):
            t.data = parked
        self.ready.pop(i, None)

    # --- hooks ------------------------------------------------------------------------------------
    def _before(self, i: int) -> None:
        self.fetch(i)
        if i not in self.pinned:
            self._copy(i + 1)  # the next block copies while this one computes

    def _after(self, i: int, args, out) -> None:
        if i in self.pinned:  # recomputed for its backward: keep it until that is done
            return
        if torch.is_grad_enabled():
            outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if torch.is_tensor(t) and t.requires_grad]
            ins = [t for t in args if torch.is_tensor(t) and t.requires_grad]
            if outs:
                for t in outs:
                    t.register_hook(lambda g, i=i, n=len(ins): self._backward_starts(i, n))
                for t in ins:
                    t.register_hook(lambda g, i=i: self._input_grad(i))
        self.release(i)

    def _backward_starts(self, i: int, inputs: int) -> None:
        if i not in self.pinned:
            self.pinned.add(i)
            self.waiting[i] = inputs
            self.fetch(i)
            self._copy(i - 1)  # backward runs the blocks in reverse

    def _input_grad(self, i: int) -> None:
        """One of the block's input gradients is complete; after the last, its backward is done."""
        if i in self.pinned:
            self.waiting[i] -= 1
            if self.waiting[i] <= 0:
                self._backward_done(i)

    def _backward_done(self, i: int) -> None:
        if i in self.pinned:
            self.pinned.discard(i)
            self.waiting.pop(i, None)
            self.release(i)

    def finish_step(self) -> None:
        """After a step's backward: release what a block without an input gradient (the first one) kept."""
        for i in list(self.pinned):
            self._backward_done(i)
        for i in [i for i in self.ready if i not in self.pinned]:
            self.release(i)
