"""Test-only ComfyUI nodes for tests/test_full_width_loaders.py (never shipped in the pack): what a
full-width FLUX / Qwen-Image graph needs besides its real UNETLoader, without the full-size text
encoders (T5-XXL, Qwen2.5-VL-7B): seeded CONDITIONING of the model's text width, and a LoRA
safetensors file read as a LORA_MODEL (the dict the core Load LoRA Model / Save LoRA nodes pass)."""
import torch


class HYWUTestConditioning:
    CATEGORY = "HY-WU tests"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    DESCRIPTION = "Test helper: seeded text features (and a pooled vector) as CONDITIONING."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "text tokens"}),
            "width": ("INT", {"default": 4096, "min": 1, "max": 8192, "tooltip": "text feature width"}),
            "pooled": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "pooled_output width (0: none)"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "random seed"}),
        }}

    def make(self, tokens, width, pooled, seed):
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}
        return ([[torch.randn(1, tokens, width, generator=g), extra]],)


class HYWUTestLoRAFile:
    CATEGORY = "HY-WU tests"
    RETURN_TYPES = ("LORA_MODEL",)
    FUNCTION = "load"
    DESCRIPTION = "Test helper: a LoRA safetensors file (any path) as a LORA_MODEL."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "a .safetensors LoRA file"})}}

    def load(self, path):
        import comfy.utils

        return (comfy.utils.load_torch_file(path, safe_load=True),)


NODE_CLASS_MAPPINGS = {"HYWUTestConditioning": HYWUTestConditioning, "HYWUTestLoRAFile": HYWUTestLoRAFile}
NODE_DISPLAY_NAME_MAPPINGS = {"HYWUTestConditioning": "HY-WU test conditioning (tests only)",
                              "HYWUTestLoRAFile": "HY-WU test LoRA file (tests only)"}
