"""The micro SD1.5-InstructPix2Pix UNet stored the ways users' diffusion-model files are, for
UNETLoader (tests/test_quantized_bases.py). Not a test module.

Each file holds the UNet of the seeded micro checkpoint (LDM keys without the
``model.diffusion_model.`` prefix, as diffusion_models/ files have them):

* ``bf16``: every weight in bf16 (the reference);
* ``fp8_e4m3fn``: the 2D (linear) weights cast to float8_e4m3fn with no scale, like the
  ``*_fp8_e4m3fn.safetensors`` files (UNETLoader's default weight_dtype reads their dtype);
* ``fp8_scaled``: linear weights in float8_e4m3fn with a per-tensor ``weight_scale`` and the
  ``_quantization_metadata`` JSON of ComfyUI's mixed-precision format (QUANTIZATION.md);
* ``fp8_scaled_legacy``: the older scaled layout (a ``scaled_fp8`` marker tensor, per-layer
  ``scale_weight``) of the ``*_fp8_scaled.safetensors`` files from 2025;
* ``int8_tensorwise``: int8 weights with a per-tensor ``weight_scale`` (newer ComfyUI only).

fp8 through UNETLoader's ``weight_dtype`` option is the bf16 file with ``fp8_e4m3fn`` chosen.
Only linear weights are quantized, as the released fp8 files do (norms, biases, convolutions stay).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PREFIX = "model.diffusion_model."
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
FORMATS = ("bf16", "fp8_e4m3fn", "fp8_scaled", "fp8_scaled_legacy", "int8_tensorwise")


def unet_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    with safe_open(str(checkpoint), "pt") as f:
        return {k[len(PREFIX):]: f.get_tensor(k).to(torch.bfloat16) for k in f.keys() if k.startswith(PREFIX)}


def _linear_layers(sd) -> list[str]:
    return [k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]


def quantize(sd: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of the UNet ``sd`` (bf16) stored as ``fmt``."""
    out = dict(sd)
    metadata: dict[str, str] = {}
    if fmt == "bf16":
        return out, metadata
    layers = {}
    for layer in _linear_layers(sd):
        w = sd[layer + ".weight"].float()
        if fmt == "fp8_e4m3fn":
            out[layer + ".weight"] = w.to(torch.float8_e4m3fn)
            continue
        if fmt == "int8_tensorwise":
            scale = w.abs().max().clamp(min=1e-12) / 127.0
            out[layer + ".weight"] = (w / scale).round().clamp(-127, 127).to(torch.int8)
        else:
            scale = w.abs().max().clamp(min=1e-12) / FP8_MAX
            out[layer + ".weight"] = (w / scale).to(torch.float8_e4m3fn)
        key = ".scale_weight" if fmt == "fp8_scaled_legacy" else ".weight_scale"
        out[layer + key] = scale.reshape(()).float()
        layers[layer] = {"format": "int8_tensorwise" if fmt == "int8_tensorwise" else "float8_e4m3fn"}
    if fmt == "fp8_scaled_legacy":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    elif fmt in ("fp8_scaled", "int8_tensorwise"):
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    elif fmt != "fp8_e4m3fn":
        raise ValueError(f"unknown format {fmt}")
    return out, metadata


def build_quantized_unets(checkpoint, out_dir, formats=FORMATS) -> dict[str, Path]:
    """Write hywu_micro_unet_<format>.safetensors for each format (kept when already newer than
    the checkpoint). Returns {format: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {fmt: out_dir / f"hywu_micro_unet_{fmt}.safetensors" for fmt in formats}
    stale = [f for f, p in paths.items() if not p.is_file() or p.stat().st_mtime < Path(checkpoint).stat().st_mtime]
    if stale:
        sd = unet_state_dict(checkpoint)
        for fmt in stale:
            tensors, metadata = quantize(sd, fmt)
            tmp = paths[fmt].with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or None)
            tmp.replace(paths[fmt])
    return paths
