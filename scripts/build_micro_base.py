#!/usr/bin/env python
"""Build the seeded micro SD1.5-InstructPix2Pix base model (no downloads).

Outputs
-------
1. A diffusers folder (default ``models/micro_sd15_ip2p/``) that
   ``StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)`` loads:
   ``unet/`` (UNet2DConditionModel, in_channels=8, one 320-wide CrossAttn level, 25.8M params),
   ``text_encoder/`` (CLIPTextModel with the fixed CLIP-L config, seeded random weights),
   ``tokenizer/`` (ComfyUI's own ``comfy/sd1_tokenizer`` files; only ``model_max_length`` is
   set to 77), ``vae/`` (AutoencoderTiny, TAESD-shaped, seeded), ``scheduler/`` (SD1.5 DDPM
   config) and ``model_index.json``. Weights are fp32 but every value is exactly representable
   in fp16 (rounded at build time), so the fp16 ComfyUI checkpoint holds the same numbers.
2. A ComfyUI single-file checkpoint (default
   ``models/checkpoints/hywu_micro_sd15_ip2p.safetensors``, fp16) that
   ``comfy.sd.load_checkpoint_guess_config`` (CheckpointLoaderSimple) loads as
   ``SD15_instructpix2pix`` with a TAESD VAE.

Relations between diffusers and ComfyUI 0.3.75 (verified by tests/test_comfy_infra.py, fp32 CPU)
------------------------------------------------------------------------------------------------
* **UNet**: ``model.diffusion_model.*`` is the diffusers UNet in LDM keys (map from
  ``comfy.utils.unet_to_diffusers``). The raw network
  ``model.model.diffusion_model(cat([x, concat], 1), t, context=ctx)`` equals
  ``diffusers_unet(cat([x, concat], 1), t, ctx).sample`` (max abs diff 8e-7). ComfyUI keeps the
  UNet in fp32 on CPU.
* **VAE / latent scale**: the checkpoint stores ``first_stage_model.vae_scale = 0.18215`` and
  ``vae_shift = 0`` (what ComfyUI's own VAELoader sets for ``taesd``). Hence, with
  ``x = image * 2 - 1`` (NCHW) for diffusers and ComfyUI IMAGE = BHWC in [0, 1]:

      comfy LATENT   = vae.encode(image)       == AutoencoderTiny.encode(x).latents / 0.18215
      vae.decode(z)  (BHWC, clamped to [0,1])  == ((AutoencoderTiny.decode(z * 0.18215).sample + 1) / 2).clamp(0, 1)
      UNet input ch 0-3 = latent_format.process_in(LATENT) = LATENT * 0.18215 == AutoencoderTiny latent

  (encode diff 4e-9, decode diff 0.) So the noisy latent is the same tensor in both worlds
  (diffusers AutoencoderTiny has scaling_factor 1.0).
* **InstructPix2Pix concat (UNet ch 4-7)**: InstructPixToPixConditioning stores
  ``vae.encode(pixels)`` and ``SD15_instructpix2pix`` concatenates it WITHOUT process_in
  (``process_ip2p_image_in`` is the identity), i.e. ch 4-7 = comfy LATENT =
  ``AutoencoderTiny latent / 0.18215`` (the "unscaled" convention of real IP2P with a KL VAE).
  A trainer must build its concat the same way to match ComfyUI. Note diffusers'
  StableDiffusionInstructPix2PixPipeline with an AutoencoderTiny concatenates the TAESD latent
  without dividing, so it does NOT match ComfyUI in ch 4-7. Whole denoiser-step parity
  (ComfyUI apply_model vs diffusers parts): 1e-6.
* **CLIP**: ``cond_stage_model.transformer.text_model.*`` is the transformers CLIPTextModel
  (the canonical SD1.5 layout; ComfyUI also accepts it without ``text_model.``). ComfyUI's
  SD1.5 text encoder (``clip.encode_from_tokens(clip.tokenize(p))``) uses the LAST layer
  followed by ``final_layer_norm`` (== ``CLIPTextModel(ids).last_hidden_state``), ids
  ``[49406] + tokens + [49407]`` padded to 77 with 49407 (the end token), no attention mask
  (causal only); pooled == ``pooler_output`` (hidden state at the first 49407). Transformers'
  CLIPTokenizer from ``tokenizer/`` with ``padding="max_length", max_length=77`` produces the
  same ids, and the outputs match (max abs diff 3e-6). ComfyUI stores CLIP weights in fp16 on
  CPU; they are fp16-representable here, so that costs nothing. ComfyUI's prompt syntax
  (``(word:1.2)`` weights, ``embedding:``) is not interpreted by transformers: parity holds
  for prompts without it.

CLI::

    python scripts/build_micro_base.py [--out models/micro_sd15_ip2p]
        [--checkpoint models/checkpoints/hywu_micro_sd15_ip2p.safetensors] [--seed 0]
        [--comfyui PATH] [--force]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "models" / "micro_sd15_ip2p"
DEFAULT_CKPT = REPO / "models" / "checkpoints" / "hywu_micro_sd15_ip2p.safetensors"

# ComfyUI's TAESD wrapper scales by this (VAELoader sets the same value for "taesd").
TAESD_SD15_VAE_SCALE = 0.18215

UNET_KWARGS = dict(
    sample_size=8,
    in_channels=8,
    out_channels=4,
    block_out_channels=(320,),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    cross_attention_dim=768,
    attention_head_dim=8,
)

# The unet_config ComfyUI needs for comfy.utils.unet_to_diffusers with the UNet above.
COMFY_UNET_CONFIG = dict(
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
)

CLIP_L_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    initializer_range=0.02,
    initializer_factor=1.0,
    pad_token_id=1,
    bos_token_id=49406,
    eos_token_id=49407,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """ComfyUI checkout: explicit arg, else env COMFYUI_PATH, else the newest tree
    scripts/setup_comfyui.sh set up (<repo>/.cache/comfyui-newest, ComfyUI 0.30), else 0.3.75
    (<repo>/.cache/comfyui): the order of tests/comfy_harness.py's newest_comfyui_path()."""
    for cand in (explicit, os.environ.get("COMFYUI_PATH"), REPO / ".cache" / "comfyui-newest",
                 REPO / ".cache" / "comfyui"):
        if cand and (Path(cand) / "main.py").is_file():
            return Path(cand).resolve()
    raise FileNotFoundError(
        "ComfyUI not found: pass --comfyui, set COMFYUI_PATH, or run scripts/setup_comfyui.sh"
    )


def _import_comfy(comfyui_path: str | os.PathLike):
    """Import ComfyUI's `comfy` package from a checkout without starting a server."""
    p = str(Path(comfyui_path).resolve())
    if p not in sys.path:
        sys.path.insert(0, p)
    # comfy.cli_args parses sys.argv unless told not to.
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    import torch

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # else comfy.model_management asks CUDA for a device
    import comfy.utils  # noqa: F401

    return sys.modules["comfy"]


def _round_fp16_(module):
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.float16).to(p.dtype))
    return module


def build_micro_base(out_dir=DEFAULT_OUT, seed: int = 0, comfyui_path=None) -> Path:
    """Build the diffusers folder from `seed` into `out_dir` (overwrites). Returns out_dir."""
    import torch
    from diffusers import AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    comfy_dir = find_comfyui(comfyui_path)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    torch.manual_seed(seed)
    unet = _round_fp16_(UNet2DConditionModel(**UNET_KWARGS))
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    del unet

    torch.manual_seed(seed + 1)
    te = _round_fp16_(CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG)))
    te.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    del te

    torch.manual_seed(seed + 2)
    vae = _round_fp16_(AutoencoderTiny())
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    del vae
    vcfg_path = tmp / "vae" / "config.json"  # diffusers writes an alias it then warns about
    vcfg = json.loads(vcfg_path.read_text())
    vcfg.pop("block_out_channels", None)
    vcfg_path.write_text(json.dumps(vcfg, indent=2))

    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    src = comfy_dir / "comfy" / "sd1_tokenizer"
    for f in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy2(src / f, tok_dir / f)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    cfg.pop("special_tokens_map_file", None)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    CLIPTokenizer.from_pretrained(tok_dir)  # sanity: loads

    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")

    import diffusers

    model_index = {
        "_class_name": "StableDiffusionInstructPix2PixPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderTiny"],
    }
    (tmp / "model_index.json").write_text(json.dumps(model_index, indent=2))
    (tmp / "hywu_micro_base.json").write_text(
        json.dumps({"seed": seed, "builder": "scripts/build_micro_base.py"}, indent=2)
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _taesd_comfy_keys(vae_sd: dict) -> dict:
    """diffusers AutoencoderTiny state dict -> ComfyUI comfy/taesd/taesd.py TAESD keys.

    Encoder Sequentials have the same indices. ComfyUI's Decoder Sequential starts with a
    parameterless Clamp (diffusers applies tanh(x/3)*3 outside its Sequential), so decoder
    indices shift by +1.
    """
    out = {}
    for k, v in vae_sd.items():
        if k.startswith("encoder.layers."):
            out["taesd_encoder." + k[len("encoder.layers."):]] = v
        elif k.startswith("decoder.layers."):
            rest = k[len("decoder.layers."):]
            idx, _, tail = rest.partition(".")
            out[f"taesd_decoder.{int(idx) + 1}.{tail}"] = v
        else:
            raise KeyError(f"unexpected AutoencoderTiny key {k}")
    return out


def comfy_unet_state_dict(unet_sd: dict, comfyui_path=None) -> dict:
    """diffusers UNet2DConditionModel state dict (micro config) -> LDM keys (no prefix)."""
    _import_comfy(find_comfyui(comfyui_path))
    import comfy.utils

    m = comfy.utils.unet_to_diffusers(dict(COMFY_UNET_CONFIG))
    out = {}
    missing = []
    for k, v in unet_sd.items():
        if k in m:
            out[m[k]] = v
        else:
            missing.append(k)
    if missing:
        raise KeyError(f"no LDM mapping for diffusers UNet keys: {missing[:10]}")
    return out


def export_comfy_checkpoint(diffusers_dir, out_path, comfyui_path=None, dtype="fp16") -> Path:
    """Write a ComfyUI single-file checkpoint from a diffusers folder built by build_micro_base.

    Keys: ``model.diffusion_model.*`` (UNet, LDM layout), ``cond_stage_model.transformer.text_model.*``
    (CLIP-L), ``first_stage_model.taesd_encoder.* / taesd_decoder.*`` plus
    ``first_stage_model.vae_scale`` (0.18215) and ``vae_shift`` (0). Can be called again after
    training the UNet (e.g. by the demo). Returns out_path.
    """
    import torch
    from safetensors.torch import load_file, save_file

    d = Path(diffusers_dir)
    out_path = Path(out_path)
    tdtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]

    sd = {}
    unet_sd = load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors"))
    for k, v in comfy_unet_state_dict(unet_sd, comfyui_path).items():
        sd["model.diffusion_model." + k] = v
    te_sd = load_file(str(d / "text_encoder" / "model.safetensors"))
    for k, v in te_sd.items():
        if k.endswith("position_ids"):
            continue
        sd["cond_stage_model.transformer." + k] = v
    vae_sd = load_file(str(d / "vae" / "diffusion_pytorch_model.safetensors"))
    for k, v in _taesd_comfy_keys(vae_sd).items():
        sd["first_stage_model." + k] = v
    sd = {k: v.to(tdtype).contiguous() for k, v in sd.items()}
    sd["first_stage_model.vae_scale"] = torch.tensor(TAESD_SD15_VAE_SCALE, dtype=torch.float32)
    sd["first_stage_model.vae_shift"] = torch.tensor(0.0, dtype=torch.float32)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "hywu_micro_base": "sd15_instructpix2pix"})
    os.replace(tmp, out_path)
    return out_path


def ensure_micro_base(out_dir=DEFAULT_OUT, checkpoint=DEFAULT_CKPT, seed=0, comfyui_path=None, force=False):
    """Build what is missing (or everything with force). Returns (diffusers_dir, checkpoint)."""
    import fcntl

    out_dir, checkpoint = Path(out_dir), Path(checkpoint)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Several test sessions may start at once: one builds, the others wait and reuse.
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = False
        if force or not (out_dir / "model_index.json").is_file():
            build_micro_base(out_dir, seed, comfyui_path)
            built = True
        if force or built or not checkpoint.is_file():
            export_comfy_checkpoint(out_dir, checkpoint, comfyui_path)
    return out_dir, checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="diffusers output folder")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CKPT), help="ComfyUI checkpoint path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--comfyui", default=None, help="ComfyUI path (default: $COMFYUI_PATH, else .cache/comfyui-newest, else .cache/comfyui)")
    ap.add_argument("--force", action="store_true", help="rebuild even when outputs exist")
    a = ap.parse_args(argv)
    t0 = time.time()
    d, c = ensure_micro_base(a.out, a.checkpoint, a.seed, a.comfyui, a.force)
    print(f"micro base: {d}\ncheckpoint: {c}\n({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
