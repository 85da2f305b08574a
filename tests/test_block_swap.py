"""Block swap (train.blocks_to_swap, trainer/block_swap.py): the base's last blocks live in CPU memory and are
fetched ahead of use, forward and backward.

Here (CPU) the same code path runs with the CPU as the accelerator, and released blocks point at NaN
(``poison_released``): any use of a block that is not fetched would show up as NaN, so equal results prove the
fetch / release order, with and without the base's activation checkpointing. On a machine with CUDA,
test_swapped_blocks_leave_the_gpu checks the memory and the side-stream copies."""
from __future__ import annotations

import pytest
import torch


def _loss_and_grad(family, swap, checkpointing, tmp_path, device="cpu", weight_dtype="bf16"):
    from tiny_models import generator_loss_and_grad

    from trainer.block_swap import BlockSwap
    from trainer.families import load_family
    from trainer.tiny_bases import tiny_config

    cfg = tiny_config(family, tmp_path / "run", fast=False, base={"weight_dtype": weight_dtype})
    adapter = load_family(cfg, torch.device(device), torch.float32)
    if checkpointing:
        adapter.enable_gradient_checkpointing()
    swapper = BlockSwap(adapter.denoiser, swap, torch.device(device), poison_released=True) if swap else None
    loss, grad = generator_loss_and_grad(adapter, device=device)
    if swapper:
        swapper.finish_step()
    return loss, grad, swapper, adapter


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", ["sd15_ip2p", "flux_kontext", "flux2_klein"])
def test_results_are_identical_with_and_without_swapping(family, checkpointing, tmp_path):
    loss0, grad0, _, _ = _loss_and_grad(family, 0, checkpointing, tmp_path)
    loss1, grad1, swapper, adapter = _loss_and_grad(family, 2, checkpointing, tmp_path)
    assert loss1 == loss0 and torch.equal(grad1, grad0) and torch.isfinite(grad1).all()
    assert swapper.fetches == 4  # each swapped block fetched once for its forward and once for its backward
    assert not swapper.pinned and not swapper.ready  # all released after the step
    with torch.no_grad():  # sampling (no gradient) releases each block right after it runs
        out = adapter.sample(torch.rand(1, 3, 32, 32), ["make it blue"], 2)
    sampled = swapper.fetches - 4  # both blocks once per denoiser forward (2 steps, 2 forwards a step with CFG)
    assert torch.isfinite(out).all() and sampled in (4, 8) and not swapper.ready


def test_swap_with_an_fp8_base(tmp_path):
    loss0, grad0, _, _ = _loss_and_grad("flux2_klein", 0, True, tmp_path, weight_dtype="fp8_scaled")
    loss1, grad1, _, _ = _loss_and_grad("flux2_klein", 2, True, tmp_path, weight_dtype="fp8_scaled")
    assert loss1 == loss0 and torch.equal(grad1, grad0)


def test_a_training_run_with_swapped_blocks_equals_one_without(tmp_path):
    from trainer.tiny_bases import tiny_config
    from trainer.train import run

    losses = []
    for n in (0, 1):
        cfg = tiny_config("flux_kontext", tmp_path / f"run{n}", train={"max_steps": 3, "log_every": 1, "blocks_to_swap": n,
                                                                       "base_gradient_checkpointing": True})
        losses.append(run(cfg, progress=False)["losses"])
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_blocks_to_swap_is_checked(tmp_path):
    from trainer.block_swap import BlockSwap
    from trainer.config import ConfigError, TrainConfig, validate
    from trainer.tiny_bases import tiny_config

    cfg = TrainConfig()
    cfg.base.path = "x"
    cfg.train.blocks_to_swap = -1
    with pytest.raises(ConfigError, match="blocks_to_swap"):
        validate(cfg)
    cfg.train.blocks_to_swap, cfg.train.fsdp = 2, True
    with pytest.raises(ConfigError, match="FSDP"):
        validate(cfg)
    from trainer.families import load_family

    adapter = load_family(tiny_config("flux_kontext", tmp_path / "r"), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="this base has 2 blocks to swap"):
        BlockSwap(adapter.denoiser, 3, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path is tested above)")
def test_swapped_blocks_leave_the_gpu(tmp_path):
    from trainer.families import load_family
    from trainer.tiny_bases import tiny_config

    cfg = tiny_config("flux_kontext", tmp_path / "run", train={"blocks_to_swap": 2})
    adapter = load_family(cfg, torch.device("cuda"), torch.float32)
    swap = adapter.denoiser.hywu_block_swap
    assert all(t.device.type == "cpu" and t.is_pinned() for b in swap.blocks for t in b.parameters())
    assert all(p.device.type == "cuda" for n, p in adapter.denoiser.named_parameters() if "transformer_blocks" not in n)
    loss0, grad0, _, _ = _loss_and_grad("flux_kontext", 0, True, tmp_path, device="cuda")
    loss1, grad1, _, _ = _loss_and_grad("flux_kontext", 2, True, tmp_path, device="cuda")
    assert abs(loss1 - loss0) <= 1e-6 * abs(loss0) and torch.allclose(grad1, grad0, rtol=1e-5, atol=1e-7)
