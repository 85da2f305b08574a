"""HY-WU Apply Generated LoRA: MODEL + LORA_MODEL -> a patched clone of the MODEL.

Mirrors ``comfy.sd.load_lora_for_models`` (0.3.75): ``comfy.lora.model_lora_keys_unet`` key map,
``comfy.lora_convert.convert_lora``, ``comfy.lora.load_lora`` -> patches, ``model.clone()`` +
``add_patches(patches, strength)``; so every base ComfyUI loads is patched the way its LoRAs are.
"""
from __future__ import annotations

import time

import comfy.lora
import comfy.lora_convert
from comfy_api.latest import io

from .common import float_input_problem, log
from .types import CATEGORY, HYWUError, LoraModel

# Suffixes of one LoRA module's entries, in the formats comfy.weight_adapter reads.
_SUFFIXES = (
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha", ".dora_scale",
    ".lora_B.weight", ".lora_A.weight", ".lora.up.weight", ".lora.down.weight", ".lora_linear_layer.up.weight",
    ".lora_linear_layer.down.weight", ".lora_B.default.weight", ".lora_A.default.weight", ".lora_B", ".lora_A",
    ".diff", ".diff_b", ".set_weight", ".w_norm", ".b_norm",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".oft_blocks", ".rescale", ".glora_a1", ".glora_a2", ".glora_b1", ".glora_b2",
)


def lora_modules(lora: dict) -> list[str]:
    """The module keys of a LoRA state dict ('lora_unet_..._to_q' for '..._to_q.lora_up.weight')."""
    mods = []
    seen = set()
    for k in lora:
        for s in sorted(_SUFFIXES, key=len, reverse=True):
            if k.endswith(s):
                m = k[: -len(s)]
                break
        else:
            m = k
        if m not in seen:
            seen.add(m)
            mods.append(m)
    return mods


def guess_family(lora: dict) -> str | None:
    family = getattr(lora, "base_family", None)
    if family:
        return family
    keys = list(lora)
    if any(k.startswith("lora_unet_") for k in keys):
        return "sd15_ip2p (or another UNet base)"
    if any(k.startswith("transformer.") for k in keys):
        return "a DiT base (Flux Kontext or Qwen-Image-Edit)"
    return None


def model_name(model) -> str:
    inner = getattr(model, "model", None)
    cfg = getattr(inner, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(inner).__name__


def select_lora(lora, batch_index: int) -> dict:
    batch = getattr(lora, "batch", None) or [lora]
    n = len(batch)
    if batch_index >= n:
        raise HYWUError(
            f"HY-WU Apply Generated LoRA: batch_index is {batch_index}, but the LoRA input holds {n} LoRA(s) "
            f"(one per image given to Condition Encode). Set batch_index to 0..{n - 1}, or give Condition Encode "
            f"a batch of at least {batch_index + 1} images.")
    if n > 1:
        log.info("HY-WU: the LoRA input holds %d LoRAs; applying LoRA %d (batch_index) to this model. The other "
                 "%d are not used by this node; add one Apply node per LoRA to use them.", n, batch_index, n - 1)
    return batch[batch_index]


def apply_lora(model, lora: dict, strength: float, batch_index: int = 0):
    """Clone ``model`` and add the LoRA's patches. Returns (model, stats)."""
    t0 = time.perf_counter()
    family = guess_family(lora)
    generator = getattr(lora, "generator_name", None)
    chosen = select_lora(lora, batch_index)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    converted = comfy.lora_convert.convert_lora(chosen)
    modules = lora_modules(converted)
    matched = [m for m in modules if m in key_map]
    unmatched = [m for m in modules if m not in key_map]
    if not matched:
        origin = f" by generator '{generator}'" if generator else ""
        raise HYWUError(
            f"HY-WU Apply Generated LoRA: none of the {len(modules)} LoRA modules match this model "
            f"({model_name(model)}). The LoRA was generated{origin} for base family {family or 'unknown'}; load the "
            "checkpoint that generator was trained for, or pick a generator trained for this checkpoint.")
    patches = comfy.lora.load_lora(converted, {m: key_map[m] for m in matched}, log_missing=False)
    new_model = model.clone()
    added = set(new_model.add_patches(patches, strength))
    not_patched = [k for k in patches if k not in added]
    seconds = time.perf_counter() - t0
    stats = {"modules": len(modules), "matched": len(matched), "unmatched": len(unmatched),
             "patched": len(added), "seconds": seconds}
    if unmatched:
        log.warning("HY-WU Apply Generated LoRA: %d of %d LoRA modules have no layer in %s and are skipped "
                    "(base family %s): %s%s", len(unmatched), len(modules), model_name(model), family,
                    ", ".join(unmatched[:8]), " ..." if len(unmatched) > 8 else "")
    for k in not_patched:
        log.warning("HY-WU Apply Generated LoRA: NOT LOADED %s", k)
    log.debug("HY-WU: applied LoRA %d (%s) to %s at strength %g: %d/%d modules matched, %d weights patched "
              "in %.3f s", batch_index, family, model_name(model), strength, len(matched), len(modules), len(added),
              seconds)
    return new_model, stats


class HYWUApplyGeneratedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HYWUApplyGeneratedLoRA",
            display_name="HY-WU Apply Generated LoRA",
            category=CATEGORY,
            description="Applies a generated LoRA to a copy of the diffusion model with ComfyUI's own LoRA key maps "
                        "and weight patches (the input model is not changed).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model of the checkpoint the generator was trained for."),
                LoraModel.Input("lora", tooltip="The LoRA from HY-WU Generate LoRA (any standard LORA_MODEL also works)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA changes the model (1 = as trained, 0 = model unchanged, "
                                       "negative values push the other way)."),
                io.Int.Input("batch_index", default=0, min=0, max=4095,
                             tooltip="A batch of N images in Condition Encode makes N LoRAs; a model carries one, so "
                                     "this picks which (0 = the first). The others are ignored here: use one Apply "
                                     "node per LoRA to sample each."),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="A clone of the model with the LoRA patched in; connect it to the sampler."),
            ],
        )

    @classmethod
    def validate_inputs(cls, strength=None):
        # None: linked (checked when the node runs) or missing (ComfyUI reports that itself).
        return True if strength is None else float_input_problem(cls, "strength", strength) or True

    @classmethod
    def execute(cls, model, lora, strength, batch_index=0) -> io.NodeOutput:
        problem = float_input_problem(cls, "strength", strength)  # a linked value skipped validation
        if problem:
            raise HYWUError(problem)
        if strength == 0:
            select_lora(lora, batch_index)  # still report a batch_index that does not fit
            log.debug("HY-WU: strength 0, the model is returned unchanged")
            return io.NodeOutput(model)
        new_model, _ = apply_lora(model, lora, strength, batch_index)
        return io.NodeOutput(new_model)
