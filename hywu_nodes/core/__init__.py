"""Pure-torch core of HY-WU: target spec, parameter tokenizer, generator, functional LoRA,
LoRA export and the generator file format. Imports neither ComfyUI nor diffusers."""
from .checkpoint import GeneratorFileError, GeneratorInfo, load_generator, read_generator_info, save_generator
from .footprint import Footprint, MemoryBudget, estimate_footprint
from .conditions import (
    CONDITION_KINDS, Condition, ConditionSource, ConditionSpec, patchify_latent, prompt_mask, square_resize,
    standard_condition_spec,
)
from .functional_lora import GeneratedLoRA, concat_ranks, lora_delta, lora_patched, merge_lora_
from .generator import PRESETS, GeneratorConfig, HYWUGenerator, condition_statistics, describe, without_shared
from .lora_format import from_lora_state_dict, lora_module_key, to_lora_state_dict
from .targets import BASE_FAMILIES, DEFAULT_PATTERNS, LinearTarget, TargetSpec, build_target_spec
from .tokenizer import ParameterTokenizer

__all__ = [
    "BASE_FAMILIES", "CONDITION_KINDS", "DEFAULT_PATTERNS", "PRESETS",
    "Condition", "ConditionSource", "ConditionSpec", "Footprint", "GeneratedLoRA", "GeneratorConfig", "GeneratorFileError",
    "GeneratorInfo", "HYWUGenerator", "LinearTarget", "MemoryBudget", "ParameterTokenizer", "TargetSpec",
    "build_target_spec", "concat_ranks", "condition_statistics", "describe", "estimate_footprint", "from_lora_state_dict", "load_generator",
    "lora_delta", "lora_module_key", "lora_patched", "merge_lora_", "patchify_latent", "prompt_mask", "read_generator_info",
    "square_resize", "standard_condition_spec", "save_generator", "to_lora_state_dict", "without_shared",
]
