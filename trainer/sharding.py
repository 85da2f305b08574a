"""Sharded training with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

``train.fsdp: true`` shards the trainable module (the generator, or a static LoRA) over the
processes: its weights, gradients and AdamW state each live 1/N per process, and every block
is gathered just for its own forward and backward. ``train.fsdp_shard_base: true`` also shards
the frozen base's blocks (weights only; they have no gradients or optimizer state), so a base
that does not fit on one GPU can be trained against.

Why the trainer calls ``fully_shard`` itself instead of ``accelerator.prepare``: accelerate
1.15 routes FSDP only to GPU-type process groups (on CPU it stays ``MULTI_CPU``), and its FSDP2
path takes exactly one model together with its optimizer, so it cannot shard a frozen base
that has no optimizer. Accelerate still launches the processes, owns devices, autocast and
the reductions; the sharding is the same torch engine it would call, and the same code runs
on CPU (gloo, tested) and CUDA (NCCL). A run launched with an accelerate FSDP config is
sharded this way too.
"""
from __future__ import annotations

import os
import socket

import torch
from torch import nn


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process (a single-GPU check, a 1-process resume)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks FSDP gathers one at a time: the elements of the module's top-level
    ``nn.ModuleList``s (generator blocks; UNet down/up blocks; DiT transformer blocks).
    Everything else belongs to the root unit."""
    return [m for child in module.children() if isinstance(child, nn.ModuleList) for m in child]


def shard(module: nn.Module, compute_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``module`` in place (its blocks, then the root) over the default process group.
    ``compute_dtype`` (bf16 mixed precision): gathered weights are cast to it for the forward
    and backward; gradients are reduced and kept in fp32, next to the fp32 master weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else MixedPrecisionPolicy()
    for unit in shard_units(module):
        fully_shard(unit, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(module: nn.Module) -> dict | None:
    """The unsharded weights on the main process (CPU), None elsewhere. Collective: call on
    every process."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None


def local_numel(module: nn.Module) -> int:
    """Parameter elements held by this process (a shard when sharded)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())
