"""HY-WU Load Generator: a generator file from models/hywu -> HYWU_GENERATOR."""
from __future__ import annotations

import difflib
import os
import time

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..core import GeneratorFileError, load_generator
from .common import FOLDER, display_path, generator_dtype, generator_files, log, memory_budget
from .types import CATEGORY, GeneratorHandle, HYWUError, HYWUGenerator

TITLE = "HY-WU Load Generator"


def generator_name_problem(name) -> str | None:
    """Why ``name`` cannot be loaded, said before the prompt runs (None: it is listed)."""
    if not isinstance(name, str):
        return (f"{TITLE}: generator_name is {name!r}, not a file name. Pick a generator file from the list "
                "(files in models/hywu).")
    files = generator_files()
    if name in files:
        return None
    if not name.strip():  # nothing picked (an API prompt, or a graph saved while the folder was empty)
        if not files:
            return (f"{TITLE}: no generator was picked, and models/hywu/ has no generator files yet. Put a HY-WU "
                    "generator (.safetensors: python -m trainer.train writes one; make demo in the pack's folder "
                    "writes models/hywu/hywu_demo.safetensors there) into ComfyUI/models/hywu/, press R in ComfyUI "
                    "to refresh the list and pick it.")
        return f"{TITLE}: no generator was picked (generator_name is empty). {_pick_one(files)}."
    if os.path.splitext(name)[1].lower() != ".safetensors":
        return (f"{TITLE}: '{name}' is not a .safetensors file. HY-WU loads generators from .safetensors only "
                "(pickled .pt/.ckpt/.bin files are never loaded, because they can run code). Pick a .safetensors "
                "generator from the list.")
    if not files:
        return (f"{TITLE}: '{name}' is not in models/hywu, and that folder has no generator files yet. Put a HY-WU "
                "generator (.safetensors) into ComfyUI/models/hywu/ and press R in ComfyUI to refresh the list.")
    close = difflib.get_close_matches(name, files, n=3, cutoff=0.6)
    if close:
        hint = f"Did you mean {' or '.join(repr(c) for c in close)}? Pick it in the list"
    else:
        hint = _pick_one(files)
    return (f"{TITLE}: '{name}' is not in models/hywu. {hint}; or put the file into ComfyUI/models/hywu/ and "
            "press R in ComfyUI to refresh the list.")


def _pick_one(files: list[str]) -> str:
    return "Pick one of: " + ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")


def load_generator_handle(path: str, name: str | None = None) -> GeneratorHandle:
    """Load a generator file into a ModelPatcher (weights on the offload device, in the dtype
    that suits the compute device). Raises HYWUError with what to do."""
    name = name or os.path.basename(path)
    if os.path.splitext(path)[1].lower() != ".safetensors":
        raise HYWUError(generator_name_problem(name) or f"{TITLE}: '{name}' is not a .safetensors file.")
    t0 = time.perf_counter()
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    dtype = generator_dtype(load_device)
    try:
        generator, info = load_generator(path, device=offload_device, dtype=dtype, label=display_path(name),
                                         budget=memory_budget(load_device))
    except GeneratorFileError as e:
        raise HYWUError(f"{TITLE}: {e}") from None  # the message has the cause; one traceback in the log
    patcher = comfy.model_patcher.ModelPatcher(generator, load_device=load_device, offload_device=offload_device)
    n_params = sum(p.numel() for p in generator.parameters())
    log.info("HY-WU: loaded generator %s: base family %s, %d target layers, rank %d, %.1fM parameters, %s on %s, "
             "in %.3f s", name, info.base_family, len(info.target_spec.targets), info.config.rank, n_params / 1e6,
             str(dtype).replace("torch.", ""), load_device, time.perf_counter() - t0)
    if "flux_guidance" in info.extra:  # the base gets this guidance only if the graph says so
        log.info("HY-WU: %s was trained at FLUX guidance %g: set the graph's FluxGuidance to %g, or it edits "
                 "differently than in training.", name, info.extra["flux_guidance"], info.extra["flux_guidance"])
    return GeneratorHandle(name=name, info=info, patcher=patcher, dtype=dtype)


class HYWULoadGenerator(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HYWULoadGenerator",
            display_name=TITLE,
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
    def validate_inputs(cls, generator_name=None):
        # Replaces ComfyUI's "value not in list" with a message that says what to do. A missing
        # input (None) is left to ComfyUI's own "Required input is missing".
        if generator_name is None:
            return True
        return generator_name_problem(generator_name) or True

    @classmethod
    def execute(cls, generator_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, generator_name)
        if path is None:  # removed since the prompt was validated
            raise HYWUError(generator_name_problem(generator_name) or f"{TITLE}: '{generator_name}' was not found.")
        return io.NodeOutput(load_generator_handle(path, generator_name))
