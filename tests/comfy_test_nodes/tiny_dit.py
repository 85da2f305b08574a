"""Test-only loader: a tiny diffusers FLUX / Qwen-Image transformer folder -> ComfyUI MODEL, built with
ComfyUI's own classes (never shipped in the pack).

ComfyUI's model detection fixes the widths of FLUX (24 heads, axes [16, 56, 56], so hidden 3072) and
Qwen-Image (3072 wide, text 3584), so its UNETLoader refuses the trainer's tiny bases. This loader does
what the tail of ``comfy.sd.load_diffusion_model_state_dict`` does (supported-model config ->
model_base -> ModelPatcher) with the unet_config read from the diffusers ``config.json`` instead of
detected; FLUX weights go through ComfyUI's own diffusers -> BFL conversion
(``comfy.model_detection.convert_diffusers_mmdit``), Qwen-Image's DiT already uses diffusers names.
Everything after loading (model code, key maps, samplers, ReferenceLatent, FluxGuidance, the pack's
nodes) is ComfyUI's and the pack's real code. Full-width files go through the real UNETLoader in
tests/test_full_width_loaders.py.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file


def unet_config(diffusers_config: dict) -> dict:
    """ComfyUI's unet_config for a diffusers FluxTransformer2DModel / QwenImageTransformer2DModel config."""
    c = diffusers_config
    name = c.get("_class_name")
    if name == "FluxTransformer2DModel":
        heads = c["num_attention_heads"]
        latent_channels = c["in_channels"] // 4  # diffusers packs 2x2 patches into the channels
        return dict(image_model="flux", in_channels=latent_channels, out_channels=(c.get("out_channels") or c["in_channels"]) // 4,
                    vec_in_dim=c["pooled_projection_dim"], context_in_dim=c["joint_attention_dim"],
                    hidden_size=heads * c["attention_head_dim"], mlp_ratio=4.0, num_heads=heads, depth=c["num_layers"],
                    depth_single_blocks=c["num_single_layers"], axes_dim=list(c["axes_dims_rope"]), theta=10000,
                    qkv_bias=True, guidance_embed=bool(c["guidance_embeds"]), patch_size=2)
    if name == "QwenImageTransformer2DModel":
        return dict(image_model="qwen_image", in_channels=c["in_channels"], out_channels=c["out_channels"],
                    num_layers=c["num_layers"], attention_head_dim=c["attention_head_dim"],
                    num_attention_heads=c["num_attention_heads"], joint_attention_dim=c["joint_attention_dim"],
                    axes_dims_rope=tuple(c["axes_dims_rope"]), patch_size=c.get("patch_size", 2))
    raise ValueError(f"HY-WU test loader: {name!r} is not a FLUX or Qwen-Image transformer")


def tiny_dit_patcher(folder):
    """ModelPatcher of the diffusers transformer in ``folder`` (config.json + diffusion_pytorch_model.safetensors)."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    folder = Path(folder)
    cfg = unet_config(json.loads((folder / "config.json").read_text()))
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    if cfg["image_model"] == "flux":
        import comfy.ldm.flux.model

        sd = comfy.model_detection.convert_diffusers_mmdit(sd, "")
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
            cfg["txt_ids_dims"] = []  # newer ComfyUI (0.28+): its detection sets [] for FLUX.1
        model_config = (comfy.supported_models.Flux if cfg["guidance_embed"] else comfy.supported_models.FluxSchnell)(cfg)
    else:
        model_config = comfy.supported_models.QwenImage(cfg)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd),
                          supported_dtypes=list(model_config.supported_inference_dtypes), weight_dtype=comfy.utils.weight_dtype(sd))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes))
    model = model_config.get_model(sd, "").to(offload_device)
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


class HYWUTestTinyDiTLoader:
    CATEGORY = "HY-WU tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    DESCRIPTION = "Test helper: a tiny diffusers FLUX / Qwen-Image transformer folder as a ComfyUI MODEL."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "a diffusers transformer folder "
                                                                        "(config.json + diffusion_pytorch_model.safetensors)"})}}

    def load(self, path):
        return (tiny_dit_patcher(path),)
