"""Test-only Qwen-Image text encoder and VAE: the trainer's tiny Qwen base (trainer/tiny_bases.py) -> a real
ComfyUI CLIP / VAE (never shipped in the pack).

CLIP: what CLIPLoader(type qwen_image) builds (``comfy.sd.CLIP`` of ``QwenImageTokenizer`` with ComfyUI's shipped
qwen25_tokenizer files, ``QwenImageTEModel`` -> ``Qwen25_7BVLIModel`` (SDClipModel) -> ``Qwen25_7BVLI``), with one
change: ``Qwen25_7BVLI`` fixes Qwen2.5-VL-7B's widths (head_dim 128 and the M-RoPE sections are class
attributes of its config, the vision tower is built 1280 wide), so a subclass builds the same ComfyUI modules
(``Llama2_``, ``Qwen2VLVisionTransformer``) at the tiny base's config. Weights are the trainer's
(transformers saves Qwen2.5-VL's checkpoint names, ``model.*`` / ``visual.*``, which are ComfyUI's).
The vision tokens come in raster order (transformers' and newer ComfyUI's; 0.3.75 keeps its window
order, tests/test_family_qwen_parity.py measures it). fp32, so parity is exact on CPU. Everything else (tokenize with images, process_qwen2vl_images, the image
embedding splice, M-RoPE ids, the template drop) is ComfyUI's code.

VAE: the Wan 2.1 state dict ComfyUI's own VAELoader detects (``decoder.middle.0.residual.0.gamma``), made from
the trainer's diffusers AutoencoderKLQwenImage through diffusers' own Wan -> diffusers key conversion read
backwards; :func:`write_comfy_vae` saves it for the real VAELoader of a template graph.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _text_config(base: Path) -> dict:
    cfg = json.loads((Path(base) / "text_encoder" / "config.json").read_text())
    return cfg["text_config"], cfg["vision_config"]


def qwen_te_class(text: dict, vision: dict, raster_order: bool = True):
    """A QwenImageTEModel class whose Qwen2.5-VL has the given transformers text / vision configs.
    ``raster_order``: the vision tokens in raster order, as transformers and newer ComfyUI give them (see
    :class:`RasterVision`); False: ComfyUI 0.3.75's window order."""
    import comfy.sd1_clip as sd1_clip
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_image as qwen_image
    import comfy.text_encoders.qwen_vl as qwen_vl

    fields = {f.name for f in dataclasses.fields(llama.Qwen25_7BVLI_Config)}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}

    @dataclasses.dataclass
    class Config(llama.Qwen25_7BVLI_Config):
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        rope_dims = list(rope["mrope_section"])

    class RasterVision(qwen_vl.Qwen2VLVisionTransformer):
        """ComfyUI 0.3.75 returns the merged vision tokens in window-attention order; transformers and
        newer ComfyUI (which added the same reordering: "present in the HF implementation") in raster order."""

        def forward(self, pixel_values, image_grid_thw=None):
            window_index, _ = self.get_window_index(image_grid_thw)
            return super().forward(pixel_values, image_grid_thw)[torch.argsort(window_index)]

    vision_class = RasterVision if raster_order else qwen_vl.Qwen2VLVisionTransformer

    class TinyQwen25VLI(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):  # Qwen25_7BVLI.__init__ at the tiny widths
            torch.nn.Module.__init__(self)
            config = Config(**{k: v for k, v in config_dict.items() if k in fields})
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.visual = vision_class(
                hidden_size=vision["hidden_size"], output_hidden_size=vision["out_hidden_size"],
                intermediate_size=vision["intermediate_size"], num_heads=vision["num_heads"], num_layers=vision["depth"],
                patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"],
                spatial_merge_size=vision["spatial_merge_size"], window_size=vision["window_size"],
                device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    llm = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")}
    llm["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", 1000000.0))

    class TinyVLModel(qwen_image.Qwen25_7BVLIModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True, model_options={}):
            sd1_clip.SDClipModel.__init__(  # Qwen25_7BVLIModel's arguments, with the tiny model class and config
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(llm), dtype=dtype,
                special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=TinyQwen25VLI,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask, model_options=model_options)

    class TinyQwenImageTE(qwen_image.QwenImageTEModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, name="qwen25_7b", clip_model=TinyVLModel,
                                           model_options=model_options)

    return TinyQwenImageTE


def comfy_te_state_dict(base) -> dict:
    """The tiny base's Qwen2.5-VL weights under ComfyUI's Qwen25_7BVLI names."""
    sd = load_file(str(Path(base) / "text_encoder" / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.visual."):
            out["visual." + k[len("model.visual."):]] = v
        elif k.startswith(("model.", "visual.")):  # transformers 5 saves the checkpoint layout, which is ComfyUI's
            out[k] = v
    return out


def tiny_qwen_clip(base, raster_order: bool = True):
    """ComfyUI CLIP (QwenImageTokenizer + QwenImageTEModel at the tiny config) of the tiny base folder ``base``."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.qwen_image as qwen_image

    text, vision = _text_config(base)
    target = comfy.supported_models_base.ClipTarget(qwen_image.QwenImageTokenizer, qwen_te_class(text, vision, raster_order))
    sd = comfy_te_state_dict(base)
    clip = comfy.sd.CLIP(target, parameters=sum(v.numel() for v in sd.values()), model_options={"dtype": torch.float32})
    missing, unexpected = clip.load_sd(sd)
    if missing or unexpected:
        raise ValueError(f"tiny Qwen CLIP: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return clip


def comfy_vae_state_dict(base) -> dict:
    """The tiny base's diffusers AutoencoderKLQwenImage as the Wan 2.1 state dict ComfyUI's VAE loads: the key map
    is diffusers' own ``convert_wan_vae_to_diffusers`` applied to ComfyUI's WanVAE keys, read backwards."""
    import comfy.ldm.wan.vae as wan_vae
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    folder = Path(base) / "vae"
    cfg = json.loads((folder / "config.json").read_text())
    ours = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    with torch.device("meta"):
        wan = wan_vae.WanVAE(dim=cfg["base_dim"], z_dim=cfg["z_dim"], dim_mult=cfg["dim_mult"], num_res_blocks=cfg["num_res_blocks"],
                             attn_scales=cfg["attn_scales"], temperal_downsample=cfg["temperal_downsample"]).state_dict()
    keys = list(wan)
    converted = convert_wan_vae_to_diffusers({k: torch.tensor([float(i)]) for i, k in enumerate(keys)})
    out = {}
    for name, marker in converted.items():
        k = keys[int(marker.flatten()[0])]
        out[k] = ours[name].reshape(wan[k].shape).contiguous()
    if len(out) != len(keys):
        raise ValueError(f"tiny Qwen VAE: {len(keys) - len(out)} Wan keys without a diffusers weight")
    return out


def write_comfy_vae(base, path) -> Path:
    """Save :func:`comfy_vae_state_dict` where ComfyUI's VAELoader finds it (models/vae/<name>.safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(comfy_vae_state_dict(base), str(path))
    return path


def tiny_qwen_vae(base):
    import comfy.sd

    return comfy.sd.VAE(sd=comfy_vae_state_dict(base), dtype=torch.float32)


class HYWUTestTinyQwenTE:
    CATEGORY = "HY-WU tests"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    DESCRIPTION = "Test helper: the tiny Qwen base's Qwen2.5-VL as ComfyUI's QwenImageTEModel (what CLIPLoader qwen_image gives)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "tiny Qwen base folder (text_encoder/)"})}}

    def load(self, path):
        return (tiny_qwen_clip(path),)


# TextEncodeQwenImageEditPlus's template and image prefix (in its execute(); the test server cannot import the pack by
# name, so the twin keeps its own copy; test_edit_encode_twin_matches_the_core_nodes compares the calls)
QWEN_PLUS_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
                      "background), then explain how the user's text instruction should alter or modify the image. Generate a "
                      "new image that meets the user's requirements while maintaining consistency with the original input where "
                      "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
QWEN_PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def area_resize(image, total: int, multiple: int = 1):
    """(B, H, W, C) -> about ``total`` pixels, aspect kept, ComfyUI's area upscale (the Qwen edit nodes' rule)."""
    import math

    import comfy.utils

    samples = image.movedim(-1, 1)
    s = math.sqrt(total / (samples.shape[3] * samples.shape[2]))
    w, h = samples.shape[3] * s, samples.shape[2] * s
    w, h = (round(w), round(h)) if multiple == 1 else (round(w / multiple) * multiple, round(h / multiple) * multiple)
    return comfy.utils.common_upscale(samples, w, h, "area", "disabled").movedim(1, -1)


class HYWUTestQwenEditEncode:
    """TextEncodeQwenImageEdit / TextEncodeQwenImageEditPlus (one image) with their pixel totals as inputs. The core
    nodes fix 1 MP for the reference (and 1 MP / 384^2 for Qwen2.5-VL), which takes minutes per graph with the tiny
    CPU VAE; everything else is the same ComfyUI calls (tests/test_family_qwen.py checks that, at the core nodes'
    totals, it hands the CLIP and the VAE exactly what they do)."""

    CATEGORY = "HY-WU tests"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    DESCRIPTION = "Test helper: TextEncodeQwenImageEdit(Plus) at smaller pixel totals."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP",), "prompt": ("STRING", {"multiline": True, "tooltip": "instruction"}), "vae": ("VAE",), "image": ("IMAGE",),
            "plus": ("BOOLEAN", {"default": False, "tooltip": "TextEncodeQwenImageEditPlus's prompt (Picture 1:, its template)"}),
            "vl_pixels": ("INT", {"default": 1024 * 1024, "min": 64, "max": 1 << 26, "tooltip": "area shown to Qwen2.5-VL"}),
            "reference_pixels": ("INT", {"default": 1024 * 1024, "min": 64, "max": 1 << 26, "tooltip": "area of the reference latent"}),
        }}

    def encode(self, clip, prompt, vae, image, plus=False, vl_pixels=1024 * 1024, reference_pixels=1024 * 1024):
        import node_helpers

        vl = area_resize(image, vl_pixels)
        if plus:
            ref = area_resize(image, reference_pixels, 8)
            tokens = clip.tokenize(QWEN_PICTURE.format(1) + prompt, images=[vl], llama_template=QWEN_PLUS_TEMPLATE)
        else:
            ref = vl if reference_pixels == vl_pixels else area_resize(image, reference_pixels)  # Edit: one 1 MP image for both
            tokens = clip.tokenize(prompt, images=[vl[:, :, :, :3]])
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        latent = vae.encode(ref[:, :, :, :3])
        return (node_helpers.conditioning_set_values(conditioning, {"reference_latents": [latent]}, append=True),)
