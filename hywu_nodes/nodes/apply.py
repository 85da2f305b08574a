"""HY-WU Apply Generated LoRA: MODEL + LORA_MODEL -> a clone of the MODEL that computes with the LoRA(s).

Both modes read the LoRA the way ``comfy.sd.load_lora_for_models`` (0.3.75) does:
``comfy.lora.model_lora_keys_unet`` key map, ``comfy.lora_convert.convert_lora``,
``comfy.lora.load_lora`` -> patches; so every base ComfyUI loads is matched the way its LoRAs are.
* runtime (default): ``runtime_lora.install`` adds ``W x + s * B_b (A_b x)`` per sample through
  object patches and an APPLY_MODEL wrapper on the clone; weights untouched, one LoRA per edit.
* patch: ``model.clone()`` + ``add_patches(patches, strength)``: one LoRA merged into the weights.
"""
from __future__ import annotations

import time

import comfy.lora
import comfy.lora_convert
from comfy_api.latest import io

from . import runtime_lora
from .guidance_check import watch_guidance
from .common import combo_input_problem, float_input_problem, log
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


MODES = ("runtime", "patch")


def select_lora(lora, batch_index: int, quiet: bool = False) -> dict:
    batch = getattr(lora, "batch", None) or [lora]
    n = len(batch)
    if batch_index >= n:
        raise HYWUError(
            f"HY-WU Apply Generated LoRA: batch_index is {batch_index}, but the LoRA input holds {n} LoRA(s) "
            f"(one per edit made by Condition Encode). Set batch_index to 0..{n - 1} (or -1 for all, one per "
            f"sample, in runtime mode), or give Condition Encode at least {batch_index + 1} edits.")
    if n > 1 and not quiet:
        log.info("HY-WU: the LoRA input holds %d LoRAs; applying LoRA %d (batch_index) to this model. The other "
                 "%d are not used by this node; runtime mode with batch_index -1 gives each sample its own.",
                 n, batch_index, n - 1)
    return batch[batch_index]


def select_loras(lora, batch_index: int, mode: str) -> list[dict]:
    """The LoRAs this node applies: all of the batch (batch_index -1, runtime mode) or one."""
    batch = getattr(lora, "batch", None) or [lora]
    if batch_index >= 0:
        return [select_lora(lora, batch_index, quiet=mode == "patch")]  # patch mode logs when it applies
    if mode == "patch" and len(batch) > 1:
        raise HYWUError(
            f"HY-WU Apply Generated LoRA: the LoRA input holds {len(batch)} LoRAs (one per edit), but patch mode "
            f"merges one LoRA into the weights. Set mode to 'runtime' (each sample gets its own LoRA), or set "
            f"batch_index to 0..{len(batch) - 1} to patch one.")
    return list(batch)


def match_lora(model, lora: dict, key_map: dict, source=None):
    """(patches for the model, LoRA module names, unmatched names) with ComfyUI's key map; none
    matching is an error naming the base family the LoRA was made for (``source``: the LORA_MODEL
    that carries the generator's name, when ``lora`` is one LoRA of its batch)."""
    source = lora if source is None else source
    converted = comfy.lora_convert.convert_lora(lora)
    modules = lora_modules(converted)
    matched = [m for m in modules if m in key_map]
    unmatched = [m for m in modules if m not in key_map]
    if not matched:
        generator = getattr(source, "generator_name", None)
        origin = f" by generator '{generator}'" if generator else ""
        raise HYWUError(
            f"HY-WU Apply Generated LoRA: none of the {len(modules)} LoRA modules match this model "
            f"({model_name(model)}). The LoRA was generated{origin} for base family {guess_family(source) or 'unknown'}; "
            "load the checkpoint that generator was trained for, or pick a generator trained for this checkpoint.")
    patches = comfy.lora.load_lora(converted, {m: key_map[m] for m in matched}, log_missing=False)
    return patches, modules, unmatched


def _warn_unmatched(model, lora, modules, unmatched):
    if unmatched:
        log.warning("HY-WU Apply Generated LoRA: %d of %d LoRA modules have no layer in %s and are skipped "
                    "(base family %s): %s%s", len(unmatched), len(modules), model_name(model), guess_family(lora),
                    ", ".join(unmatched[:8]), " ..." if len(unmatched) > 8 else "")


def apply_lora(model, lora: dict, strength: float, batch_index: int = 0):
    """Patch mode: clone ``model`` and add the LoRA's weight patches. Returns (model, stats)."""
    t0 = time.perf_counter()
    chosen = select_lora(lora, batch_index)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches, modules, unmatched = match_lora(model, chosen, key_map, lora)
    new_model = model.clone()
    added = set(new_model.add_patches(patches, strength))
    not_patched = [k for k in patches if k not in added]
    seconds = time.perf_counter() - t0
    stats = {"modules": len(modules), "matched": len(modules) - len(unmatched), "unmatched": len(unmatched),
             "patched": len(added), "seconds": seconds}
    _warn_unmatched(model, lora, modules, unmatched)
    for k in not_patched:
        log.warning("HY-WU Apply Generated LoRA: NOT LOADED %s", k)
    log.debug("HY-WU: applied LoRA %d (%s) to %s at strength %g: %d/%d modules matched, %d weights patched "
               "in %.3f s", batch_index, guess_family(lora), model_name(model), strength, stats["matched"],
              len(modules), len(added), seconds)
    return new_model, stats


def runtime_fallback(model, loras: list[dict]) -> bool:
    """True when runtime mode would not compute right on ``model`` (newer ComfyUI, see
    runtime_lora.runtime_problem): one LoRA then goes through patch mode with a warning saying
    why; N LoRAs (one per sample, which only runtime mode does) are refused."""
    problem = runtime_lora.runtime_problem(model)
    if problem is None:
        return False
    if len(loras) > 1:
        raise HYWUError(
            f"HY-WU Apply Generated LoRA: runtime mode cannot give each sample its own LoRA here: {problem}. "
            f"Set batch_index to 0..{len(loras) - 1} (one LoRA for every sample, merged with patch mode), or "
            "connect a MODEL without that (e.g. the loader's output directly).")
    log.warning("HY-WU Apply Generated LoRA: runtime mode would not apply here (%s); using patch mode (the LoRA "
                "is merged into the weights with ComfyUI's own weight patches) instead.", problem)
    return True


def apply_runtime_lora(model, lora, loras: list[dict], strength: float):
    """Runtime mode: clone ``model`` and install ``loras`` (one per sample) as runtime LoRAs.
    Returns (model, stats)."""
    t0 = time.perf_counter()
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patch_sets, modules, unmatched = [], [], []
    for one in loras:
        patches, modules, unmatched = match_lora(model, one, key_map, lora)
        patch_sets.append(patches)
    new_model, info = runtime_lora.install(model, patch_sets, strength)
    seconds = time.perf_counter() - t0
    stats = {"modules": len(modules), "matched": len(modules) - len(unmatched), "unmatched": len(unmatched),
             "loras": len(loras), "runtime_layers": info["runtime_layers"], "weight_patched": info["weight_patched"],
             "seconds": seconds}
    _warn_unmatched(model, lora, modules, unmatched)
    if info["weight_patched"]:
        log.info("HY-WU: %d LoRA entries are not plain LoRAs on linear/convolution layers; they are patched into "
                 "the weights", info["weight_patched"])
    log.debug("HY-WU: applied %d LoRA(s) (%s) to %s at runtime, strength %g: %d/%d modules matched, %d layers "
              "adapted per sample, in %.3f s", len(loras), guess_family(lora), model_name(model), strength,
              stats["matched"], len(modules), info["runtime_layers"], seconds)
    return new_model, stats


class HYWUApplyGeneratedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HYWUApplyGeneratedLoRA",
            display_name="HY-WU Apply Generated LoRA",
            category=CATEGORY,
            description="Applies generated LoRAs to a copy of the diffusion model (the input model is not changed). "
                        "Runtime mode gives each sample of the sampler batch its own LoRA without touching the "
                        "weights; patch mode merges one LoRA into the weights with ComfyUI's weight patches.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model of the checkpoint the generator was trained for."),
                LoraModel.Input("lora", tooltip="The LoRA(s) from HY-WU Generate LoRA (any standard LORA_MODEL also "
                                                "works)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA changes the model (1 = as trained, 0 = model unchanged, "
                                       "negative values push the other way)."),
                io.Int.Input("batch_index", default=-1, min=-1, max=4095,
                             tooltip="-1: all LoRAs of the input, one per sample (runtime mode): N edits in one "
                                     "sampler batch, latent j uses LoRA j % N. 0..N-1: only that LoRA, for every "
                                     "sample."),
                io.Combo.Input("mode", options=list(MODES), default="runtime",
                               tooltip="runtime: the weights stay untouched and each layer adds the LoRA term per "
                                       "sample (no weight copies, no re-patching per request, N LoRAs per batch). "
                                       "patch: one LoRA is merged into the weights, as core LoRA loaders do."),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="A clone of the model with the LoRA(s); connect it to the sampler."),
            ],
        )

    @classmethod
    def validate_inputs(cls, strength=None, mode=None):
        # None: linked (checked when the node runs) or missing (ComfyUI reports that itself).
        problem = None if strength is None else float_input_problem(cls, "strength", strength)
        return problem or (None if mode is None else combo_input_problem(cls, "mode", mode)) or True

    @classmethod
    def execute(cls, model, lora, strength, batch_index=-1, mode="runtime") -> io.NodeOutput:
        problem = float_input_problem(cls, "strength", strength)  # a linked value skipped validation
        if problem:
            raise HYWUError(problem)
        problem = combo_input_problem(cls, "mode", mode)  # a linked value skipped validation
        if problem:
            raise HYWUError(problem)
        loras = select_loras(lora, batch_index, mode)  # also reports a batch_index that does not fit
        if strength == 0:
            log.debug("HY-WU: strength 0, the model is returned unchanged")
            return io.NodeOutput(model)
        if mode == "patch" or runtime_fallback(model, loras):
            new_model, _ = apply_lora(model, lora, strength, max(batch_index, 0))
        else:
            new_model, _ = apply_runtime_lora(model, lora, loras, strength)
        watch_guidance(new_model, lora)
        return io.NodeOutput(new_model)
