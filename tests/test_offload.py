"""Encoders off the accelerator once the rows are encoded (train.offload_encoders, trainer/offload.py).

Here (CPU): the parking steps run with the CPU as the "accelerator" (moves are no-ops, the order of work is the
real one): the constants a training step reads (the empty prompt of CFG dropout) are encoded before the
encoders leave, validation grids get them back and park them again, and a training run is the same with and
without the option. On a machine with CUDA, test_parking_frees_gpu_memory checks the memory itself."""
from __future__ import annotations

import pytest
import torch


def _adapter(family, device, tmp_path):
    from trainer.families import load_family
    from trainer.tiny_bases import tiny_config

    cfg = tiny_config(family, tmp_path / "run")
    return load_family(cfg, torch.device(device), torch.float32)


@pytest.mark.parametrize("family", ["sd15_ip2p", "flux_kontext", "flux2_klein"])
def test_parking_encodes_the_step_constants_first_and_returns_for_validation(family, tmp_path):
    from trainer.offload import EncoderParking

    adapter = _adapter(family, "cpu", tmp_path)
    parking = EncoderParking(adapter, torch.device("cpu"), enabled=True)
    assert parking.enabled is False  # on a CPU the encoders are in CPU memory already
    assert adapter.denoiser not in parking.modules and len(parking.modules) == len(adapter.frozen_modules()) - 1
    parking.enabled = True  # the accelerator's sequence, with CPU moves
    assert adapter._empty is None
    parking.park()
    assert parking.parked and adapter._empty is not None  # CFG dropout's empty prompt, encoded before the move
    with parking.on_device():
        assert not parking.parked
        out = adapter.sample(torch.rand(1, 3, 32, 32), ["make it blue"], 2)
    assert parking.parked and out.shape == (1, 3, 32, 32)


def test_a_run_is_the_same_with_and_without_offloading(tmp_path):
    from trainer.tiny_bases import tiny_config
    from trainer.train import run

    losses = []
    for offload in (True, False):
        cfg = tiny_config("flux_kontext", tmp_path / f"run{offload}", train={"max_steps": 3, "log_every": 1,
                                                                             "offload_encoders": offload, "drop_text": 0.5})
        losses.append(run(cfg, progress=False)["losses"])
    assert losses[0] == losses[1] and len(losses[0]) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path is tested above)")
def test_parking_frees_gpu_memory(tmp_path):
    from trainer.offload import EncoderParking

    adapter = _adapter("flux_kontext", "cuda", tmp_path)
    parking = EncoderParking(adapter, torch.device("cuda"), enabled=True)
    before = torch.cuda.memory_allocated()
    parking.park()
    freed = before - torch.cuda.memory_allocated()
    assert all(p.device.type == "cpu" for m in parking.modules for p in m.parameters())
    assert all(p.device.type == "cuda" for p in adapter.denoiser.parameters())
    assert freed >= 0.9 * parking.bytes()
    with parking.on_device():
        assert all(p.device.type == "cuda" for m in parking.modules for p in m.parameters())
