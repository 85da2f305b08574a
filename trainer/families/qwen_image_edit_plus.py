"""Qwen-Image-Edit-2509 / 2511 ("Plus"): the Qwen-Image-Edit adapter with the prompt of ComfyUI's
``TextEncodeQwenImageEditPlus`` (and diffusers' ``QwenImageEditPlusPipeline``): each image is named in the
user turn ("Picture 1: <|vision_start|><|image_pad|><|vision_end|>") before the instruction, under the
plain edit template; Qwen2.5-VL sees the image at about 384 x 384 pixels, the reference latent is made
from about 1 MP with sides a multiple of 8. Everything else (encoders, loss, sampler, RoPE) is the Edit
adapter's. The trainer has one source image per edit, so the prompt names one picture."""
from __future__ import annotations

from hywu_nodes.core.qwen_prompts import QWEN_EDIT_PLUS_TEMPLATE, QWEN_PICTURE

from .qwen_image_edit import REQUIRED, QwenImageEdit

__all__ = ["QwenImageEditPlus", "REQUIRED"]


class QwenImageEditPlus(QwenImageEdit):
    name = "qwen_image_edit_plus"
    TEMPLATE = QWEN_EDIT_PLUS_TEMPLATE  # the node's llama_template
    PICTURE = QWEN_PICTURE
    VL_PIXELS = 384 * 384
    REFERENCE_PIXELS = 1024 * 1024
    REFERENCE_MULTIPLE = 8

    def prompt(self, instruction: str) -> str:
        return self.TEMPLATE.format(self.PICTURE.format(1) + instruction)
