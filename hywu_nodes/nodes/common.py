"""Shared helpers: the ``models/hywu`` folder, the example inputs, device/dtype choice and
memory budget, float- and combo-input checks, latent formats, logging."""
from __future__ import annotations

import logging
import math
import os
import shutil

import torch

import comfy.model_management as mm
import folder_paths

from ..core import MemoryBudget

log = logging.getLogger("HY-WU")

FOLDER = "hywu"
EXTENSIONS = {".safetensors"}
PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE_INPUTS = os.path.join(PACK_DIR, "example_workflows", "input")


def register_model_folder() -> list[str]:
    """Register ``models/hywu`` (safetensors only) and create it, so a user sees where generators
    go. Paths a user already set for ``hywu`` in ``extra_model_paths.yaml`` (loaded by ComfyUI
    before custom nodes) are kept, in front."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    paths = list(entry[0]) if entry else []
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    try:
        os.makedirs(default, exist_ok=True)
    except OSError as e:  # a read-only models folder: the other paths still work
        log.warning("HY-WU: could not create %s (%s); put generators into a 'hywu' folder of extra_model_paths.yaml",
                    default, e)
    log.info("HY-WU: generator files (.safetensors) are read from %s", " and ".join(paths))
    return paths


def install_example_inputs() -> list[str]:
    """Copy the example workflows' source images into ComfyUI's input folder, so Load Image finds
    them when a user opens an example. Existing files are never overwritten."""
    copied = []
    if not os.path.isdir(EXAMPLE_INPUTS):
        return copied
    target = folder_paths.get_input_directory()
    for name in sorted(os.listdir(EXAMPLE_INPUTS)):
        dst = os.path.join(target, name)
        if name.endswith(".png") and not os.path.exists(dst):
            try:
                os.makedirs(target, exist_ok=True)
                shutil.copyfile(os.path.join(EXAMPLE_INPUTS, name), dst)
                copied.append(name)
            except OSError as e:
                log.warning("HY-WU: could not copy the example image %s into %s (%s)", name, target, e)
    if copied:
        log.debug("HY-WU: copied example images into %s: %s", target, ", ".join(copied))
    return copied


def generator_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if os.path.splitext(f)[1].lower() in EXTENSIONS]


def display_path(name: str) -> str:
    """How messages name a generator file: relative to the models folder, never a server path."""
    return f"models/{FOLDER}/{name}"


def memory_budget(load_device) -> MemoryBudget:
    """What a generator may use: available RAM (it is loaded there), and on an accelerator the
    device's total memory (ComfyUI offloads other models to make room when it runs)."""
    ram = int(mm.get_free_memory(torch.device("cpu")))
    if mm.is_device_cpu(load_device):
        return MemoryBudget(ram=ram)
    return MemoryBudget(ram=ram, device=int(mm.get_total_memory(load_device)))


def float_input_problem(node_cls, name: str, value) -> str | None:
    """None when ``value`` is a finite number within the FLOAT input's declared min/max, else the
    message. (A node that names a FLOAT input in validate_inputs makes ComfyUI skip its own
    min/max check for it, and ComfyUI lets NaN through its min/max check anyway.)"""
    schema = node_cls.define_schema()
    spec = next(i for i in schema.inputs if i.id == name)
    lo = -math.inf if spec.min is None else spec.min
    hi = math.inf if spec.max is None else spec.max
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{schema.display_name}: {name} is {value!r}, not a number. Set {name} to a number from {lo:g} to {hi:g}."
    if not math.isfinite(value) or not lo <= value <= hi:
        default = "" if spec.default is None else f" (default {spec.default:g})"
        return (f"{schema.display_name}: {name} is {value}; it must be a finite number from {lo:g} to {hi:g}. "
                f"Set {name} to a value in that range{default}.")
    return None


def combo_input_problem(node_cls, name: str, value) -> str | None:
    """None when ``value`` is one of the COMBO input's options, else the message. ComfyUI 0.3.75
    does not check a V3 node's option list for a prompt sent through the API, so without this
    a wrong value fails only when the node runs (after the models have loaded)."""
    schema = node_cls.define_schema()
    options = list(next(i for i in schema.inputs if i.id == name).options)
    if isinstance(value, str) and value in options:
        return None
    return f"{schema.display_name}: {name} is {value!r}; it must be one of {', '.join(map(repr, options))}. Pick one in the list."


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
    if family in ("qwen_image_edit", "qwen_image_edit_plus"):  # the Qwen-Image VAE is Wan 2.1's
        return lf.Wan21()
    if family == "flux2_klein":  # the FLUX.2 VAE normalises its latents itself (identity format)
        return lf.Flux2()
    if latent_channels == 16:
        return lf.Flux()
    if latent_channels == 128:  # the FLUX.2 VAE
        return lf.Flux2()
    return lf.SD15()


def offload(patcher) -> None:
    """Move a model that ComfyUI's model management loaded back to its offload device now."""
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is patcher:
            if loaded.model_unload():
                mm.current_loaded_models.pop(i)
            break
