"""The pack's V3 extension: ``comfy_entrypoint`` (imported by the repo-root ``__init__``)."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .apply import HYWUApplyGeneratedLoRA
from .common import install_example_inputs, register_model_folder
from .encode import HYWUConditionEncode
from .generate import HYWUGenerateLoRA
from .load_generator import HYWULoadGenerator

register_model_folder()

NODES: list[type[io.ComfyNode]] = [HYWULoadGenerator, HYWUConditionEncode, HYWUGenerateLoRA, HYWUApplyGeneratedLoRA]


class HYWUExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> HYWUExtension:
    install_example_inputs()  # only when ComfyUI loads the pack, never on a plain import
    return HYWUExtension()
