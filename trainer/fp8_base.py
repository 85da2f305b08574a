"""A frozen denoiser with its linear weights stored in fp8 (``base.weight_dtype``), as ComfyUI runs fp8 files.

``fp8_e4m3fn``: each weight cast to float8_e4m3fn (what ComfyUI's ``weight_dtype: fp8_e4m3fn`` and plain fp8
files hold); ``fp8_scaled``: divided by a per-tensor scale (its absolute maximum / 448, the largest e4m3 value)
first, the layout of ComfyUI's "fp8 scaled" files, which keeps small weights out of fp8's subnormal range.
Each layer computes in its input's dtype (bf16 in training): the weight is upcast (and rescaled) for that call
only, so the base needs 1 byte per linear weight at rest. The backward pass upcasts it again instead of keeping
the upcast copy (autograd would save one per layer for the gradient of the input, a bf16 base beside the fp8
one without checkpointing). The generated LoRA's forward hooks add their term to the layer's output in the
compute dtype, as before; gradients reach the generator through the layer's input.
Biases, norms and embeddings keep the training dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_DTYPES = ("bf16", "fp8_e4m3fn", "fp8_scaled")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _dequantize(w8: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    w = w8.to(dtype)
    return w if scale is None else w * scale.to(dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with W stored in fp8 and frozen: only the fp8 weight is kept for backward."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias):
        ctx.save_for_backward(w8, scale)
        ctx.x_dtype, ctx.has_scale = x.dtype, scale is not None
        return F.linear(x, _dequantize(w8, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        grad_x = grad @ _dequantize(w8, scale if ctx.has_scale else None, grad.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` (so target specs and LoRA hooks find it) whose frozen weight is fp8, upcast per call."""

    scale: torch.Tensor | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scaled: bool) -> "Fp8Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        if scaled:
            scale = (w.abs().amax().float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
            q = (w.float() / scale).to(FP8)
            new.register_buffer("scale", scale.reshape(()))
        else:
            q, new.scale = w.to(FP8), None
        new.weight = nn.Parameter(q, requires_grad=False)
        new.bias = linear.bias
        return new

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return _dequantize(self.weight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not torch.is_grad_enabled() or not x.requires_grad:
            return F.linear(x, self.dequantized(x.dtype), bias)
        return _Fp8Linear.apply(x, self.weight, self.scale, bias)


def store_in_fp8(model: nn.Module, weight_dtype: str) -> int:
    """Replace every ``nn.Linear`` of ``model`` by an :class:`Fp8Linear` (in place); returns how many.
    ``weight_dtype`` "bf16" leaves the model as loaded."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"base.weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    if weight_dtype == "bf16":
        return 0
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Fp8Linear.from_linear(child, scaled=weight_dtype == "fp8_scaled"))
                n += 1
    return n
