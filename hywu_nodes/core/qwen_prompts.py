"""The Qwen-Image-Edit prompts, one copy for the trainer and the nodes: the chat template that
diffusers' QwenImageEdit(Plus)Pipeline and ComfyUI's TextEncodeQwenImageEdit(Plus) wrap an
instruction in, with the source image inside the user turn (tests/test_family_qwen_parity.py
checks the token ids against ComfyUI's own nodes)."""

QWEN_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image that meets the "
    "user's requirements while maintaining consistency with the original input where appropriate.<|im_end|>\n")
QWEN_IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
# TextEncodeQwenImageEditPlus's llama_template: the pictures are named inside the user turn
QWEN_EDIT_PLUS_TEMPLATE = QWEN_EDIT_SYSTEM + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QWEN_PICTURE = "Picture {}: " + QWEN_IMAGE_TOKENS
