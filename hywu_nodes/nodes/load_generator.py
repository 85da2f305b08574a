"""HY-WU Load Generator: a generator file from models/hywu -> HYWU_GENERATOR."""
from __future__ import annotations

import os
import time

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..core import GeneratorFileError, load_generator
from .common import FOLDER, generator_dtype, generator_files, log
from .types import CATEGORY, GeneratorHandle, HYWUError, HYWUGenerator


def load_generator_handle(path: str, name: str | None = None) -> GeneratorHandle:
    """Load a generator file into a ModelPatcher (weights on the offload device, in the dtype
    that suits the compute device). Raises HYWUError with what to do."""
    name = name or os.path.basename(path)
    if os.path.splitext(path)[1].lower() != ".safetensors":
        raise HYWUError(
            f"HY-WU Load Generator: '{name}' is not a .safetensors file. HY-WU loads generators from "
            ".safetensors only (pickled .pt/.ckpt/.bin files are refused for safety); use the file "
            "trainer.train wrote into models/hywu/.")
    t0 = time.perf_counter()
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    dtype = generator_dtype(load_device)
    try:
        generator, info = load_generator(path, device=offload_device, dtype=dtype)
    except GeneratorFileError as e:
        msg = str(e)
        if "readable" in msg or "could not read" in msg or "do not match" in msg:
            msg += (". The file is damaged or incomplete: copy it again (or export it again with trainer.train), "
                    "or pick another generator.")
        raise HYWUError(f"HY-WU Load Generator: {msg}") from e
    patcher = comfy.model_patcher.ModelPatcher(generator, load_device=load_device, offload_device=offload_device)
    n_params = sum(p.numel() for p in generator.parameters())
    log.info("HY-WU: loaded generator %s: base family %s, %d target layers, rank %d, %.1fM parameters, %s on %s, "
             "in %.3f s", name, info.base_family, len(info.target_spec.targets), info.config.rank, n_params / 1e6,
             str(dtype).replace("torch.", ""), load_device, time.perf_counter() - t0)
    return GeneratorHandle(name=name, info=info, patcher=patcher, dtype=dtype)


class HYWULoadGenerator(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HYWULoadGenerator",
            display_name="HY-WU Load Generator",
            category=CATEGORY,
            description="Loads a HY-WU generator: a network that writes a LoRA for each request "
                        "(source image + edit instruction) for the frozen base model it was trained for.",
            inputs=[
                io.Combo.Input(
                    "generator_name",
                    options=generator_files(),
                    tooltip="Generator file (.safetensors) in models/hywu/ (or a 'hywu' path in "
                            "extra_model_paths.yaml). Use a generator trained for the checkpoint of this graph.",
                ),
            ],
            outputs=[
                HYWUGenerator.Output(
                    display_name="generator",
                    tooltip="The generator, with its base family and the condition it reads. Connect it to "
                            "HY-WU Generate LoRA (and to Condition Encode to check the encoders early).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, generator_name):
        # The file is checked when the node runs (missing, not .safetensors, not a generator), so the
        # error text says what to do instead of ComfyUI's generic "value not in list".
        return True

    @classmethod
    def execute(cls, generator_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, generator_name)
        if path is None:
            raise HYWUError(
                f"HY-WU Load Generator: '{generator_name}' was not found in {folder_paths.get_folder_paths(FOLDER)}. "
                "Put the generator file into models/hywu/ and refresh (press R in the UI).")
        return io.NodeOutput(load_generator_handle(path, generator_name))
