"""Export a generated LoRA as a standard LoRA state dict.

Keys use the kohya layout ``<module key>.lora_down.weight`` (A), ``.lora_up.weight`` (B) and
``.alpha``, with the module key each base family's LoRAs carry, so ComfyUI's ``comfy.lora`` key
maps (and the core "Load LoRA Model" / "Save LoRA" nodes) accept it.
"""
from __future__ import annotations

import torch

from .functional_lora import GeneratedLoRA


def lora_module_key(family: str, name: str) -> str:
    """ComfyUI-recognised LoRA key for a diffusers module name of ``family``."""
    if family == "sd15_ip2p":
        return "lora_unet_" + name.replace(".", "_")  # ComfyUI maps diffusers UNet names this way
    if family in ("flux_kontext", "qwen_image_edit", "qwen_image_edit_plus", "flux2_klein"):
        return "transformer." + name  # diffusers-trained DiT LoRA layout
    raise ValueError(f"no LoRA key layout known for base family '{family}'")


def to_lora_state_dict(lora: GeneratedLoRA, family: str, index: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Sample ``index``'s LoRA as a flat state dict (scale kept through ``alpha``)."""
    rank = lora.rank
    out = {}
    for name, (a, b) in lora.weights.items():
        key = lora_module_key(family, name)
        out[f"{key}.lora_down.weight"] = a[index].detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = b[index].detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(lora.scale * rank, dtype=torch.float32)
    return out


def from_lora_state_dict(state: dict[str, torch.Tensor], family: str, targets) -> GeneratedLoRA:
    """The inverse of :func:`to_lora_state_dict` for the layers of ``targets`` (a TargetSpec):
    a batch-1 :class:`GeneratedLoRA` from a kohya-layout LoRA (e.g. a trainer baseline file).
    Every target must be present with one rank and one scale (alpha / rank)."""
    weights, scales = {}, set()
    for t in targets.targets:
        key = lora_module_key(family, t.name)
        try:
            a, b = state[f"{key}.lora_down.weight"].float(), state[f"{key}.lora_up.weight"].float()
        except KeyError:
            raise KeyError(f"the LoRA has no weights for layer {t.name} ({key})") from None
        alpha = state.get(f"{key}.alpha")
        scales.add(round(float(alpha) / a.shape[0], 6) if alpha is not None else 1.0)
        weights[t.name] = (a[None], b[None])
    if len(scales) != 1:
        raise ValueError(f"the LoRA's layers use different scales {sorted(scales)}; expected one alpha / rank")
    return GeneratedLoRA(weights, scales.pop())
