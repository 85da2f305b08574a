"""Test-only FLUX.2 [klein] loaders: the trainer's tiny klein base (trainer/tiny_bases.py) -> a real ComfyUI MODEL,
CLIP and VAE (never shipped in the pack).

MODEL: ComfyUI loads FLUX.2 only from BFL keys (its diffusers converter reads biases FLUX.2 does not have), so
:func:`bfl_state_dict` writes the diffusers Flux2Transformer2DModel weights under BFL names (the inverse of
diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``: fused qkv, ``norm_out`` halves swapped). The
unet_config is ComfyUI's own detection of that state dict, with only the rope axes and the head count taken from
the diffusers config (detection fixes 128-wide heads, axes [32, 32, 32, 32]); the full-width file in
tests/test_family_flux2.py goes through the real UNETLoader with nothing overridden.

CLIP: what CLIPLoader(type flux2) builds for qwen_3_4b (``KleinTokenizer`` with ComfyUI's shipped Qwen files,
``Flux2TEModel`` over ``Qwen3_4BModel`` taps 9, 18, 27), with the Qwen3 widths of the tiny base instead of
Qwen3-4B's (an SDClipModel subclass passes them as the model's config). fp32, so parity is exact on CPU.

VAE: ``comfy.sd.VAE`` with the diffusers weights (ComfyUI converts diffusers VAE keys itself) and an explicit
config with ``batch_norm_latent`` (the checkpoint-config path; its detection fixes ch 128), then the 16x
downscale and 128 latent channels detection would have set.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

RENAME = {"x_embedder": "img_in", "context_embedder": "txt_in",
          "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
          "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
          "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
          "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
          "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
          "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
          "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear"}
DOUBLE = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm", "attn.to_out.0": "img_attn.proj",
          "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2", "attn.norm_added_q": "txt_attn.norm.query_norm",
          "attn.norm_added_k": "txt_attn.norm.key_norm", "attn.to_add_out": "txt_attn.proj",
          "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
          "attn.norm_k": "norm.key_norm"}
QKV = {"img_attn.qkv": ("to_q", "to_k", "to_v"), "txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def bfl_state_dict(sd: dict) -> dict:
    """A diffusers Flux2Transformer2DModel state dict under the BFL names ComfyUI's FLUX.2 loads (norms as .scale)."""
    out = {}
    for k, v in sd.items():
        base, part = k.rsplit(".", 1)
        if base in RENAME:
            out[f"{RENAME[base]}.{part}"] = v
        elif base == "norm_out.linear":  # diffusers (scale, shift), BFL (shift, scale)
            scale, shift = v.chunk(2, 0)
            out[f"final_layer.adaLN_modulation.1.{part}"] = torch.cat([shift, scale], 0)
        elif base.startswith("transformer_blocks."):
            _, i, rest = base.split(".", 2)
            if rest.split(".")[-1] in sum(QKV.values(), ()):
                continue
            out[f"double_blocks.{i}.{DOUBLE[rest]}.{'scale' if 'norm' in rest else part}"] = v
        elif base.startswith("single_transformer_blocks."):
            _, i, rest = base.split(".", 2)
            out[f"single_blocks.{i}.{SINGLE[rest]}.{'scale' if 'norm' in rest else part}"] = v
        else:
            raise KeyError(f"no BFL name for the FLUX.2 weight {k}")
    blocks = {k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")}
    for i in blocks:
        for fused, parts in QKV.items():
            out[f"double_blocks.{i}.{fused}.weight"] = torch.cat([sd[f"transformer_blocks.{i}.attn.{p}.weight"] for p in parts])
    return out


def tiny_flux2_patcher(folder):
    """ModelPatcher of the diffusers Flux2 transformer in ``folder``, built by ComfyUI's own detection."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    sd = bfl_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")))
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    assert unet_config["image_model"] == "flux2", unet_config
    unet_config.update(axes_dim=list(config["axes_dims_rope"]), num_heads=config["num_attention_heads"])
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def tiny_flux2_clip(base):
    """ComfyUI CLIP (KleinTokenizer + Flux2TEModel over Qwen3 taps 9/18/27) of the tiny base folder ``base``."""
    import comfy.sd
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux
    import comfy.text_encoders.llama as llama

    text = json.loads((Path(base) / "text_encoder" / "config.json").read_text())
    config = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta") if k in text}
    if text.get("head_dim", 128) != 128:
        raise ValueError("ComfyUI's Qwen3 fixes head_dim 128; the tiny base must use it")

    class TinyQwen3(flux.Qwen3_4BModel):
        def __init__(self, device="cpu", layer=[9, 18, 27], layer_idx=None, dtype=None, attention_mask=True, model_options={}):
            sd1_clip.SDClipModel.__init__(  # Qwen3_4BModel's arguments, with the tiny widths as its config
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(config), dtype=dtype,
                special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=llama.Qwen3_4B,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask, model_options=model_options)

    class TinyKleinTE(flux.Flux2TEModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, name="qwen3_4b", model_options=model_options, clip_model=TinyQwen3)

    sd = {k: v for k, v in load_file(str(Path(base) / "text_encoder" / "model.safetensors")).items() if not k.startswith("lm_head")}
    target = comfy.supported_models_base.ClipTarget(flux.KleinTokenizer, TinyKleinTE)
    clip = comfy.sd.CLIP(target, parameters=sum(v.numel() for v in sd.values()), model_options={"dtype": torch.float32})
    missing, unexpected = clip.load_sd(sd)
    if missing or unexpected:
        raise ValueError(f"tiny klein CLIP: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return clip


def tiny_flux2_vae(base):
    """ComfyUI VAE of the tiny base's diffusers AutoencoderKLFlux2 (``base``/vae)."""
    import comfy.sd

    folder = Path(base) / "vae"
    cfg = json.loads((folder / "config.json").read_text())
    widths = cfg["block_out_channels"]
    ddconfig = {"double_z": True, "z_channels": cfg["latent_channels"], "resolution": 256, "in_channels": cfg["in_channels"],
                "out_ch": cfg["out_channels"], "ch": widths[0], "ch_mult": [w // widths[0] for w in widths],
                "num_res_blocks": cfg["layers_per_block"], "attn_resolutions": [], "dropout": 0.0, "batch_norm_latent": True}
    vae = comfy.sd.VAE(sd=load_file(str(folder / "diffusion_pytorch_model.safetensors")),
                       config={"params": {"embed_dim": cfg["latent_channels"], "ddconfig": ddconfig}}, dtype=torch.float32)
    vae.downscale_ratio = vae.upscale_ratio = 16  # what detection sets for a state dict with bn.running_mean
    vae.latent_channels = cfg["latent_channels"] * 4
    return vae


class HYWUTestTinyFlux2Loader:
    CATEGORY = "HY-WU tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    DESCRIPTION = "Test helper: a tiny diffusers FLUX.2 transformer folder as a ComfyUI MODEL."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "a diffusers Flux2Transformer2DModel folder"})}}

    def load(self, path):
        return (tiny_flux2_patcher(path),)


class HYWUTestTinyFlux2TE:
    CATEGORY = "HY-WU tests"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    DESCRIPTION = "Test helper: the tiny klein base's Qwen3 as ComfyUI's Flux2TEModel (what CLIPLoader flux2 gives)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "tiny klein base folder (text_encoder/)"})}}

    def load(self, path):
        return (tiny_flux2_clip(path),)


class HYWUTestTinyFlux2VAE:
    CATEGORY = "HY-WU tests"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    DESCRIPTION = "Test helper: the tiny klein base's AutoencoderKLFlux2 as a ComfyUI VAE."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "tiny klein base folder (vae/)"})}}

    def load(self, path):
        return (tiny_flux2_vae(path),)
