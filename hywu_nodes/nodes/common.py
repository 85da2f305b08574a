"""Shared helpers: the ``models/hywu`` folder, device/dtype choice, latent formats, logging."""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management as mm
import folder_paths

log = logging.getLogger("HY-WU")

FOLDER = "hywu"
EXTENSIONS = {".safetensors"}


def register_model_folder() -> list[str]:
    """Register ``models/hywu`` (safetensors only). Paths a user already set for ``hywu`` in
    ``extra_model_paths.yaml`` (loaded by ComfyUI before custom nodes) are kept, in front."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    paths = list(entry[0]) if entry else []
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    return paths


def generator_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if os.path.splitext(f)[1].lower() in EXTENSIONS]


def generator_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device computes it well, fp16 where ComfyUI would use fp16, else fp32
    (always fp32 on the CPU)."""
    if mm.is_device_cpu(device):
        return torch.float32
    if mm.should_use_bf16(device, prioritize_performance=True):
        return torch.bfloat16
    if mm.should_use_fp16(device, prioritize_performance=True):
        return torch.float16
    return torch.float32


def latent_format_for_family(family: str | None, latent_channels: int | None = None):
    """The latent format of the denoiser a generator's base family uses (what the trainer calls
    the model's *scaled* latent space). Without a family, guess from the VAE's channels."""
    import comfy.latent_formats as lf

    if family == "sd15_ip2p":
        return lf.SD15()
    if family == "flux_kontext":
        return lf.Flux()
    if family == "qwen_image_edit":
        return lf.Wan21()
    if latent_channels == 16:
        return lf.Flux()
    return lf.SD15()


def offload(patcher) -> None:
    """Move a model that ComfyUI's model management loaded back to its offload device now."""
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is patcher:
            if loaded.model_unload():
                mm.current_loaded_models.pop(i)
            break
