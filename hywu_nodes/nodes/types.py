"""Socket types and the Python objects that travel on them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from comfy_api.latest import io

from ..core import Condition, ConditionSpec, GeneratorInfo

CATEGORY = "HY-WU"

# Custom socket types of the pack. LORA_MODEL is ComfyUI's own type (a dict of tensors), so the
# core "Save LoRA Weights" and "Load LoRA Model" nodes accept what HY-WU Generate LoRA makes.
HYWUGenerator = io.Custom("HYWU_GENERATOR")
HYWUCond = io.Custom("HYWU_COND")
LoraModel = io.Custom("LORA_MODEL")


class HYWUError(ValueError):
    """A problem the user can fix; the message says what is wrong and what to do."""


@dataclass
class GeneratorHandle:
    """What travels on an HYWU_GENERATOR socket: the file's metadata and a ComfyUI
    ``ModelPatcher`` around the generator (loaded to the compute device only while it runs)."""

    name: str
    info: GeneratorInfo
    patcher: Any  # comfy.model_patcher.ModelPatcher
    dtype: torch.dtype

    @property
    def family(self) -> str:
        return self.info.base_family

    @property
    def condition_spec(self) -> ConditionSpec:
        return self.info.condition_spec

    def describe(self) -> str:
        return f"'{self.name}' (base family {self.family})"


@dataclass
class EncodedCondition:
    """What travels on an HYWU_COND socket.

    ``condition`` was encoded for ``spec``/``family`` (None when Condition Encode had no
    generator connected and no standard spec could be completed). The inputs are kept so that
    HY-WU Generate LoRA can encode again for its generator's spec when it differs.
    """

    condition: Condition | None
    spec: ConditionSpec | None
    family: str | None
    batch_size: int
    instruction: str
    text: torch.Tensor  # (1, T, W) text-encoder hidden states of the instruction (untruncated)
    images: torch.Tensor  # (B, H, W, 3) in [0, 1]
    vae: Any = None
    clip_vision: Any = None
    generator_name: str | None = None
    clip: Any = None  # to encode again at another hidden layer / with a mask for another generator
    instructions: list | None = None  # one per edit (one_edit_per_line); None = [instruction]


class HYWULoRA(dict):
    """A LORA_MODEL: a plain ``{key: tensor}`` dict (kohya layout) for one generated LoRA, so the
    core nodes accept it. HY-WU Generate LoRA also attaches the whole batch and where it came from."""

    base_family: str | None = None
    generator_name: str | None = None
    batch: list = None  # list[dict[str, Tensor]], one per condition; self holds batch[index]
    index: int = 0
    flux_guidance: float | None = None  # the embedded guidance a FLUX generator was trained at

    def __init__(self, *args, base_family=None, generator_name=None, batch=None, index=0, flux_guidance=None, **kw):
        super().__init__(*args, **kw)
        self.base_family = base_family
        self.generator_name = generator_name
        self.flux_guidance = flux_guidance
        self.batch = batch if batch is not None else [dict(self)]
        self.index = index
