"""Encoders off the accelerator once the rows are encoded (``train.offload_encoders``).

Every training row is encoded once before the first step (trainer/encoded.py), and so are the validation
rows; after that a training step needs only the denoiser. The text encoders and the VAE (for FLUX.1 Kontext
T5-XXL and CLIP-L, Qwen2.5-VL-7B for Qwen-Image-Edit, Qwen3 for FLUX.2 [klein]) then wait in CPU memory and
come back to the accelerator only while validation grids are sampled (the sampler encodes the instructions and
decodes its latents). Where the rows do not fit ``data.cache_mb``, every batch is encoded when drawn, so the
encoders stay on the accelerator (the trainer says so at start).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class EncoderParking:
    def __init__(self, adapter, device: torch.device, enabled: bool):
        self.adapter = adapter
        self.modules = [m for m in adapter.frozen_modules().values() if m is not adapter.denoiser]
        self.device, self.parked = device, False
        self.enabled = enabled and device.type != "cpu"  # on a CPU they are in CPU memory already

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules for t in (*m.parameters(), *m.buffers()))

    def _move(self, device) -> None:
        for m in self.modules:
            m.to(device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def park(self) -> None:
        """Move the encoders to CPU memory (once every row the run needs is encoded)."""
        if self.enabled and not self.parked:
            self.adapter.empty_text()  # what a training step reads besides the cached rows
            self._move("cpu")
            self.parked = True

    @contextmanager
    def on_device(self):
        """The encoders on the accelerator for the ``with`` block (validation grids), parked again after."""
        if not self.parked:
            yield
            return
        self._move(self.device)
        self.parked = False
        try:
            yield
        finally:
            self.park()
