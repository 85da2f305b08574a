"""ComfyUI's single model files as a base's components (``base.files``): the diffusion model a ComfyUI user
keeps in ``models/diffusion_models/``, read instead of the diffusers folder's ``transformer/``.

The file is read with safetensors (nothing is unpickled or fetched), its weights taken as stored:
bf16/fp16/fp32, fp8 e4m3fn without a scale, or ComfyUI's scaled fp8 (a per-layer ``weight_scale``, or the
older ``scale_weight`` with its ``scaled_fp8`` marker), dequantized to the training dtype. Its keys are
converted to the diffusers module's (FLUX.1 and FLUX.2: the BFL layout, with diffusers' own converters;
Qwen-Image: ComfyUI's names are diffusers') and loaded strictly into the module built from its config: the base
folder's ``<component>/config.json`` when there is one, else the shipped architecture
(trainer/architectures/; ``base.architecture`` picks e.g. ``flux2_klein_9b``). A file of another model or a truncated one is refused naming the file.
Supported: the diffusion model of every DiT family (FLUX.1 Kontext's at its real width only: diffusers'
converter assumes 3072); the text encoders and the VAE still come from the diffusers folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
SCALE_KEYS = (".weight_scale", ".scale_weight")
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _flux(sd: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    return convert_flux_transformer_checkpoint_to_diffusers(sd)


def _flux2(sd: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers(sd)


# (family, component) -> key conversion from the ComfyUI file to the diffusers module
CONVERTERS = {("flux_kontext", "transformer"): _flux,  # diffusers' converter assumes the full width (3072)
              ("flux2_klein", "transformer"): _flux2,
              ("qwen_image_edit", "transformer"): dict,
              ("qwen_image_edit_plus", "transformer"): dict}


class SingleFileError(ValueError):
    """A ``base.files`` entry that cannot be read as the component it is named for."""


def supported(family: str) -> list[str]:
    return [sub for fam, sub in CONVERTERS if fam == family]


def read_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's weights in ``dtype``, prefixes stripped, fp8 dequantized with their scales."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated or non-safetensors file
        raise SingleFileError(f"base.files: {path} is not a readable safetensors file ({e})") from None
    for prefix in PREFIXES:
        if raw and all(k.startswith(prefix) for k in raw if k != "scaled_fp8"):
            raw = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in raw.items()}
    out = {}
    for k, v in raw.items():
        if k == "scaled_fp8" or k.endswith(SCALE_KEYS):
            continue
        if v.dtype in FP8:
            layer = k[: -len(".weight")] if k.endswith(".weight") else k
            scale = next((raw[layer + s] for s in SCALE_KEYS if layer + s in raw), None)
            v = v.float() * (scale.float() if scale is not None else 1.0)
        elif not v.is_floating_point():
            raise SingleFileError(f"base.files: {path} stores {k} as {v.dtype}; the trainer reads bf16, fp16, fp32 and "
                                  "fp8 (e4m3fn, scaled) files, not integer-quantized ones")
        out[k] = v.to(dtype)
    return out


def load_component(family: str, sub: str, path, cls, config_dir: Path | None, architecture: str, dtype) -> nn.Module:
    """Component ``sub`` of ``family`` from the ComfyUI file ``path``, as the diffusers module ``cls``."""
    path = Path(path)
    if (family, sub) not in CONVERTERS:
        raise SingleFileError(f"base.files.{sub}: {family} reads single files for {', '.join(supported(family)) or 'none'} of its "
                              f"components; give {sub} as a diffusers folder in base.path")
    if not path.is_file():
        raise SingleFileError(f"base.files.{sub}: no file at {path}")
    if config_dir is not None and (config_dir / "config.json").is_file():
        config, source = json.loads((config_dir / "config.json").read_text()), f"{config_dir / 'config.json'}"
    else:
        from trainer.full_bases import architecture as shipped

        config, source = shipped(architecture, sub), f"the shipped architecture '{architecture}' (base.architecture picks another)"
    try:
        sd = CONVERTERS[(family, sub)](read_state_dict(path, dtype))
    except SingleFileError:
        raise
    except Exception as e:  # the converter met keys of another model
        raise SingleFileError(f"base.files.{sub}: {path.name} is not a {family} {sub} in ComfyUI's layout "
                              f"({type(e).__name__}: {e})") from None
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta until the file's are assigned; plain tensors (RoPE tables) real
        module = cls.from_config(config)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shapes:
        what = "; ".join(part for part in (
            f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})" if missing else "",
            f"{len(unexpected)} unknown (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
            f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(sd[shapes[0]].shape)} in the file, "
            f"{tuple(expected[shapes[0]].shape)} expected)" if shapes else "") if part)
        raise SingleFileError(f"base.files.{sub}: {path.name} does not fit the {family} {sub} of {source}: {what}. "
                              "Is it the file of another model or size, or truncated?")
    module.load_state_dict(sd, assign=True)
    return module.eval()
