"""HY-WU Generate LoRA: HYWU_GENERATOR + HYWU_COND -> LORA_MODEL (one LoRA per condition)."""
from __future__ import annotations

import itertools
import time

import torch

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..core import GeneratedLoRA, to_lora_state_dict, without_shared
from .common import log, offload
from .encode import condition_for_generator
from .types import CATEGORY, HYWUCond, HYWUError, HYWUGenerator, HYWULoRA, LoraModel


def generate_loras(generator, encoded, include_shared: bool = True) -> HYWULoRA:
    """Run the generator once per condition row on the compute device (through ComfyUI's model
    management), with a progress bar and interrupt checks between blocks. Returns LoRA 0 as the
    LORA_MODEL dict, the whole batch attached. ``include_shared=False``: without the generator's
    shared rank (the second and later edits of a chain; core.without_shared)."""
    t0 = time.perf_counter()
    cond = condition_for_generator(encoded, generator)
    try:
        cond.validate(generator.condition_spec)
    except ValueError as e:
        problem = str(e)
    else:
        problem = None
    if problem:  # raised outside the except: one traceback in the log
        raise HYWUError(f"HY-WU Generate LoRA: the condition does not fit generator {generator.describe()}: {problem}. "
                        "Connect this generator to HY-WU Condition Encode's generator input to see which encoder "
                        "is wrong.")
    patcher = generator.patcher
    shared = 0 if include_shared else patcher.model.config.shared_rank
    if not include_shared and not shared:
        log.info("HY-WU Generate LoRA: generator %s has no shared rank, so include_shared off changes nothing",
                 generator.describe())
    mm.load_models_gpu([patcher], force_full_load=True)
    gen = patcher.model
    device = patcher.load_device
    dev = torch.device(device)
    if any(t.device != dev for t in itertools.chain(gen.parameters(), gen.buffers())):
        gen.to(device)  # a partial (low-VRAM) load does not apply to this plain torch module
    n = cond.batch_size
    pbar = comfy.utils.ProgressBar(n * len(gen.blocks))

    def on_block(module, args, output):
        mm.throw_exception_if_processing_interrupted()
        pbar.update(1)

    handles = [b.register_forward_hook(on_block) for b in gen.blocks]
    batch = []
    try:
        with torch.no_grad():
            for i in range(n):
                mm.throw_exception_if_processing_interrupted()
                lora: GeneratedLoRA = gen.generate(cond.select(i).to(device=device, dtype=generator.dtype))
                lora = without_shared(lora, shared)
                batch.append(to_lora_state_dict(lora, generator.family, 0, dtype=torch.float32))
                if not all(bool(torch.isfinite(v).all()) for v in batch[-1].values()):
                    raise HYWUError(
                        f"HY-WU Generate LoRA: generator {generator.describe()} wrote NaN or infinite values for "
                        f"condition {i} ({str(generator.dtype).replace('torch.', '')}), which would give a black "
                        "image. Check that the image and instruction come from the checkpoint's own encoders; if "
                        "they do, start ComfyUI with --force-fp32 or pick another generator.")
    finally:
        for h in handles:
            h.remove()
        offload(patcher)
    seconds = time.perf_counter() - t0
    norm = sum(float(v.float().pow(2).sum()) for k, v in batch[0].items() if k.endswith("lora_up.weight")) ** 0.5
    log.debug("HY-WU: generated %d LoRA(s) with %s for '%s' in %.3f s (%d modules, |B| of LoRA 0 = %.4g)",
              n, generator.describe(), encoded.instruction[:60].replace("\n", " | "), seconds,
              sum(k.endswith(".lora_down.weight") for k in batch[0]), norm)
    return HYWULoRA(batch[0], base_family=generator.family, generator_name=generator.name, batch=batch, index=0,
                    flux_guidance=generator.info.extra.get("flux_guidance"))


class HYWUGenerateLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HYWUGenerateLoRA",
            display_name="HY-WU Generate LoRA",
            category=CATEGORY,
            description="Runs the HY-WU generator on the condition: one forward pass writes a LoRA for this image "
                        "and instruction (no test-time training).",
            inputs=[
                HYWUGenerator.Input("generator", tooltip="The generator from HY-WU Load Generator."),
                HYWUCond.Input("hywu_cond", tooltip="The condition from HY-WU Condition Encode (one row per image)."),
                io.Boolean.Input("include_shared", default=True, optional=True,
                                 tooltip="On: the LoRA includes the generator's shared part (a static LoRA inside "
                                         "every generated one). Turn it off for the second and later edits of a "
                                         "chain (Generate LoRA -> Apply twice in a row), so the shared part counts "
                                         "once, as the trainer's chained edits learn it (data.chain_shared: once). "
                                         "Generators without a shared rank ignore it."),
            ],
            outputs=[
                LoraModel.Output(
                    display_name="lora",
                    tooltip="The generated LoRA as a standard LORA_MODEL (core 'Save LoRA Weights' and 'Load LoRA "
                            "Model' accept it). A batch of N conditions gives N LoRAs: this socket holds LoRA 0 for "
                            "core nodes and carries all N; HY-WU Apply Generated LoRA (runtime mode) gives each "
                            "sample its own, or picks one with batch_index."),
            ],
        )

    @classmethod
    def execute(cls, generator, hywu_cond, include_shared: bool = True) -> io.NodeOutput:
        return io.NodeOutput(generate_loras(generator, hywu_cond, include_shared))
