"""Test-only FLUX text encoder and VAE loaders: the trainer's tiny FLUX base (trainer/tiny_bases.py,
variant built with a ComfyUI path) -> a real ComfyUI CLIP / VAE (never shipped in the pack).

CLIP: ``comfy.sd.load_text_encoder_state_dicts(..., clip_type=FLUX)``, the function DualCLIPLoader(type
flux) calls, so the CLIP is ComfyUI's own FluxClipModel (SDClipModel CLIP-L + T5XXLModel) with its own
FluxTokenizer (the shipped comfy/sd1_tokenizer and comfy/text_encoders/t5_tokenizer files). The only
change is the width: ComfyUI fixes the CLIP-L and T5-XXL configs, and reads per-model overrides from
``model_options["<model>_model_config"]``; those get the tiny base's config values. Weights are the
trainer's (transformers names are ComfyUI's names for both encoders). fp32 (``--fp32-text-enc``), so
parity is exact on CPU.

VAE: ``comfy.sd.VAE`` with the diffusers weights (it converts diffusers keys itself:
``comfy.diffusers_convert.convert_vae_state_dict``) and an explicit LDM config (the checkpoint-config
path), because its detection of a plain AutoencoderKL fixes ch=128, ch_mult (1, 2, 4, 4) and 2 blocks.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

# transformers config keys ComfyUI's CLIP-L (comfy/clip_model.py) and T5 (comfy/text_encoders/t5.py) read
CLIP_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
             "max_position_embeddings", "eos_token_id", "vocab_size", "projection_dim", "layer_norm_eps")
T5_KEYS = ("num_layers", "d_model", "d_kv", "num_heads", "d_ff", "dense_act_fn", "is_gated_act", "vocab_size", "model_type")


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _weights(folder: Path, name: str) -> dict:
    return load_file(str(folder / name))


def tiny_flux_clip(base):
    """ComfyUI CLIP (FluxClipModel + FluxTokenizer) of the tiny base folder ``base``."""
    import comfy.sd

    base = Path(base)
    clip_cfg, t5_cfg = _config(base / "text_encoder"), _config(base / "text_encoder_2")
    t5_cfg["dense_act_fn"] = {"gelu_new": "gelu_pytorch_tanh"}.get(t5_cfg["dense_act_fn"], t5_cfg["dense_act_fn"])  # same tanh GELU
    clip_l = {k: clip_cfg[k] for k in CLIP_KEYS if k in clip_cfg}
    # comfy.text_encoders.long_clipl rewrites "clip_l_model_config" from "model_config" (+ the position count)
    # for every CLIP-L state dict, so the CLIP-L overrides go in both
    options = {"clip_l_model_config": clip_l, "model_config": dict(clip_l),
               "t5xxl_model_config": {k: t5_cfg[k] for k in T5_KEYS}, "dtype": torch.float32}
    # transformers 5 saves CLIPTextModel without the "text_model." prefix that clip_l.safetensors files have
    clip_sd = {k if k.startswith("text_model.") else "text_model." + k: v
               for k, v in _weights(base / "text_encoder", "model.safetensors").items()}
    t5_sd = _weights(base / "text_encoder_2", "model.safetensors")
    return comfy.sd.load_text_encoder_state_dicts([clip_sd, t5_sd], clip_type=comfy.sd.CLIPType.FLUX, model_options=options)


def tiny_vae(base):
    """ComfyUI VAE of the tiny base's diffusers AutoencoderKL (``base``/vae)."""
    import comfy.sd

    folder = Path(base) / "vae"
    cfg = _config(folder)
    widths = cfg["block_out_channels"]
    ddconfig = {"double_z": True, "z_channels": cfg["latent_channels"], "resolution": 256, "in_channels": cfg["in_channels"],
                "out_ch": cfg["out_channels"], "ch": widths[0], "ch_mult": [w // widths[0] for w in widths],
                "num_res_blocks": cfg["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"embed_dim": cfg["latent_channels"], "ddconfig": ddconfig}}
    return comfy.sd.VAE(sd=_weights(folder, "diffusion_pytorch_model.safetensors"), config=config, dtype=torch.float32)


class HYWUTestTinyFluxTE:
    CATEGORY = "HY-WU tests"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    DESCRIPTION = "Test helper: the tiny FLUX base's CLIP-L + T5 as ComfyUI's FluxClipModel (what DualCLIPLoader gives)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "tiny FLUX base folder (text_encoder/, text_encoder_2/)"})}}

    def load(self, path):
        return (tiny_flux_clip(path),)


class HYWUTestTinyVAE:
    CATEGORY = "HY-WU tests"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    DESCRIPTION = "Test helper: a tiny base's diffusers AutoencoderKL as a ComfyUI VAE."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "tiny base folder (vae/)"})}}

    def load(self, path):
        return (tiny_vae(path),)
