"""Seeded tiny diffusers base folders for the three families (tests, demo, CPU smoke runs).

Each folder has the layout of the real base (so the family adapters load it the same way):
  sd15_ip2p:       unet/ text_encoder/ tokenizer/ vae/ (AutoencoderTiny) scheduler/
  flux_kontext:    transformer/ text_encoder/ (CLIP) tokenizer/ text_encoder_2/ (T5) tokenizer_2/ vae/ scheduler/
  qwen_image_edit(_plus): transformer/ text_encoder/ (Qwen2.5-VL) tokenizer/ (ComfyUI's qwen25 files) vae/
                   (AutoencoderKLQwenImage) scheduler/
Nothing is downloaded: tokenizers get a byte-level vocabulary written here (no merges).

    python -m trainer.tiny_bases sd15_ip2p models/tiny_sd15_ip2p
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

FAMILIES = ("sd15_ip2p", "flux_kontext", "qwen_image_edit", "qwen_image_edit_plus", "flux2_klein")
VOCAB = 514  # 256 byte chars + 256 end-of-word chars + 2 specials


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable char table (so every byte has a vocab entry)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_byte_tokenizer(folder: str | os.PathLike, max_length: int = 77) -> None:
    """A CLIP BPE tokenizer with only byte tokens: real CLIP tokenization rules, tiny vocab."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token="<|endoftext|>")
    tok.save_pretrained(str(folder))


def _save_scheduler(folder: Path, flow: bool) -> None:
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if flow:
        FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(folder / "scheduler")
    else:
        DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      clip_sample=False, prediction_type="epsilon").save_pretrained(folder / "scheduler")


def _clip_text(width: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=width,
                                        bos_token_id=512, eos_token_id=513, pad_token_id=513)).eval()


def _tiny_taesd():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4).eval()


def build_sd15(folder: Path) -> None:
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(
        sample_size=4, in_channels=8, out_channels=4, block_out_channels=(32,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).save_pretrained(folder / "unet")
    _clip_text(32).save_pretrained(folder / "text_encoder")
    write_byte_tokenizer(folder / "tokenizer")
    _tiny_taesd().save_pretrained(folder / "vae")
    _save_scheduler(folder, flow=False)


def build_sd15_bench(folder: Path) -> None:
    """SD1.5-shaped but small enough for CPU benchmarks: two resolution levels, 8 transformer blocks."""
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=16, norm_num_groups=16,
    ).save_pretrained(folder / "unet")
    _clip_text(128).save_pretrained(folder / "text_encoder")
    write_byte_tokenizer(folder / "tokenizer")
    _tiny_taesd().save_pretrained(folder / "vae")
    _save_scheduler(folder, flow=False)


def build_flux(folder: Path) -> None:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).save_pretrained(folder / "transformer")
    _clip_text(32).save_pretrained(folder / "text_encoder")
    write_byte_tokenizer(folder / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                            pad_token_id=513, eos_token_id=513, decoder_start_token_id=513)).eval().save_pretrained(folder / "text_encoder_2")
    write_byte_tokenizer(folder / "tokenizer_2", max_length=32)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
                  scaling_factor=0.3611, shift_factor=0.1159).eval().save_pretrained(folder / "vae")
    _save_scheduler(folder, flow=True)


def build_flux_comfy(folder: Path, comfyui: Path) -> None:
    """FLUX.1-shaped tiny parts that ComfyUI's own classes load (tests/comfy_test_nodes/tiny_flux_te.py):
    the tokenizers ComfyUI ships (CLIP-L BPE, T5 sentencepiece) with text encoders of their vocabularies,
    a T5 v1.1 block (gated GELU, like T5-XXL), 16 latent channels and VAE widths ComfyUI's GroupNorm(32) takes."""
    import shutil

    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).save_pretrained(folder / "transformer")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", bos_token_id=49406,
                                 eos_token_id=49407, pad_token_id=49407)).eval().save_pretrained(folder / "text_encoder")
    # ComfyUI's CLIP tokenizer files say model_max_length 8192; CLIP-L has 77 positions (as FLUX's own tokenizer says)
    AutoTokenizer.from_pretrained(str(comfyui / "comfy" / "sd1_tokenizer"), model_max_length=77).save_pretrained(str(folder / "tokenizer"))
    T5EncoderModel(T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval().save_pretrained(folder / "text_encoder_2")
    shutil.copytree(comfyui / "comfy" / "text_encoders" / "t5_tokenizer", folder / "tokenizer_2", dirs_exist_ok=True)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32,) * 4, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                  scaling_factor=0.3611, shift_factor=0.1159).eval().save_pretrained(folder / "vae")
    _save_scheduler(folder, flow=True)


QWEN_VL_TEXT = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=True)
# Qwen2.5-VL's vision tower at a tiny width; patch 14, merge 2, window 112 and the full-attention block
# indexes are the real model's (and the ones ComfyUI's Qwen2VLVisionTransformer fixes).
QWEN_VL_VISION = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])


def comfyui_checkout(comfyui: str | os.PathLike | None = None) -> Path:
    """A ComfyUI checkout (its tokenizer files): ``comfyui``, else $COMFYUI_PATH, else the newest tree
    scripts/setup_comfyui.sh set up (<repo>/.cache/comfyui-newest, whose Qwen files have klein's <think> tokens),
    else <repo>/.cache/comfyui."""
    newest = REPO / ".cache" / "comfyui-newest"
    p = Path(comfyui or os.environ.get("COMFYUI_PATH") or (newest if newest.is_dir() else REPO / ".cache" / "comfyui"))
    if not (p / "comfy" / "text_encoders").is_dir():
        raise FileNotFoundError(f"no ComfyUI checkout at {p} (the tiny Qwen base takes ComfyUI's qwen25 tokenizer files): "
                                "run scripts/setup_comfyui.sh or set COMFYUI_PATH")
    return p


def build_qwen(folder: Path, comfyui: Path | None = None) -> None:
    """Qwen-Image-Edit-shaped tiny parts that ComfyUI's own classes load too (tests/comfy_test_nodes/tiny_qwen_te.py):
    Qwen2.5-VL (text + vision tower) with ComfyUI's shipped qwen25 tokenizer, the Wan 2.1 VAE layout ComfyUI
    detects (16 latent channels, dim_mult 1 2 4 4, 2 res blocks; only the width is tiny) with Qwen-Image's
    latents_mean/std (ComfyUI's Wan21 latent format), and a DiT on its 64-channel packed latents."""
    import shutil

    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).save_pretrained(folder / "transformer")
    config = Qwen2_5_VLConfig(text_config=QWEN_VL_TEXT, vision_config=QWEN_VL_VISION, image_token_id=151655,
                              video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(folder / "text_encoder")
    shutil.rmtree(folder / "tokenizer", ignore_errors=True)  # an older build's files would shadow these
    shutil.copytree(comfyui_checkout(comfyui) / "comfy" / "text_encoders" / "qwen25_tokenizer", folder / "tokenizer")
    AutoencoderKLQwenImage(base_dim=4, z_dim=16).eval().save_pretrained(folder / "vae")  # diffusers' defaults = Qwen-Image's statistics
    _save_scheduler(folder, flow=True)


# Qwen3 at a tiny width; 30 layers, so that the hidden states entering layer 27 exist (klein reads 9, 18, 27)
# and the layers past the last tap, which the adapter drops, are there too. head_dim 128 is ComfyUI's fixed value.
QWEN3_TEXT = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=30, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)


def build_flux2_klein(folder: Path, comfyui: Path | None = None) -> None:
    """FLUX.2 [klein]-shaped tiny parts that ComfyUI's own classes load too (tests/comfy_test_nodes/tiny_flux2.py):
    Qwen3 (ComfyUI's shipped Qwen tokenizer, which klein's KleinTokenizer uses), the FLUX.2 VAE layout (32 latent
    channels, 2x2 patches and batch-norm statistics, here seeded so the normalisation is not the identity; widths
    ComfyUI's GroupNorm(32) takes), and a Flux2 DiT on its 128-channel latents with ComfyUI's fixed rope theta."""
    import shutil

    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * QWEN3_TEXT["hidden_size"], mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000,
        guidance_embeds=False,
    ).save_pretrained(folder / "transformer")
    Qwen3ForCausalLM(Qwen3Config(**QWEN3_TEXT)).eval().save_pretrained(folder / "text_encoder")
    checkout = comfyui_checkout(comfyui)
    shutil.rmtree(folder / "tokenizer", ignore_errors=True)
    shutil.copytree(checkout / "comfy" / "text_encoders" / "qwen25_tokenizer", folder / "tokenizer")
    if "<think>" not in (folder / "tokenizer" / "tokenizer_config.json").read_text():
        raise FileNotFoundError(f"the Qwen tokenizer of the ComfyUI at {checkout} has no <think> token, which "
                                "klein's prompt template uses: give a ComfyUI that runs FLUX.2 [klein] (COMFYUI_PATH)")
    vae = AutoencoderKLFlux2(block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=32, norm_num_groups=32).eval()
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.1)
        vae.bn.running_var.uniform_(0.5, 1.5)
    vae.save_pretrained(folder / "vae")
    _save_scheduler(folder, flow=True)


_BUILDERS = {"sd15_ip2p": build_sd15, "flux_kontext": build_flux, "qwen_image_edit": build_qwen, "qwen_image_edit_plus": build_qwen,
             "flux2_klein": build_flux2_klein, "sd15_bench": build_sd15_bench}


_VERSIONS = {"qwen_image_edit": 2, "qwen_image_edit_plus": 2}  # 2: Qwen2.5-VL with ComfyUI's tokenizer
# Variants whose tokenizers and component configs are the ones ComfyUI's own loaders use (a ComfyUI checkout gives the files).
_COMFY_BUILDERS = {"flux_kontext": build_flux_comfy, "qwen_image_edit": build_qwen, "qwen_image_edit_plus": build_qwen,
                   "flux2_klein": build_flux2_klein}
COMFY_TEXT_TOKENS = {"flux_kontext": 256}  # ComfyUI's FluxTokenizer pads T5 to 256 tokens (min_length), without a mask


def build_tiny_base(family: str, folder: str | os.PathLike, seed: int = 0, comfyui: str | os.PathLike | None = None) -> Path:
    """Write a seeded tiny base of ``family`` into ``folder`` (reused when already complete).
    ``comfyui``: a ComfyUI checkout; build the variant ComfyUI's own classes load, with its tokenizers."""
    builders = _COMFY_BUILDERS if comfyui else _BUILDERS
    if family not in builders:
        raise ValueError(f"no tiny base '{family}'{' for ComfyUI' if comfyui else ''}; known: {', '.join(builders)}")
    folder = Path(folder)
    marker = folder / "tiny_base.json"
    want = {"family": family, "seed": seed, **({"comfyui_tokenizers": True} if comfyui else {}),
            **({"version": _VERSIONS[family]} if family in _VERSIONS else {})}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        builders[family](folder, Path(comfyui)) if comfyui else builders[family](folder)
    marker.write_text(json.dumps(want))
    return folder


REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "tiny_bases"
# Fewer adapted layers keep CPU tests fast; the default patterns are exercised by the demo config.
FAST_TARGETS = {
    "sd15_ip2p": [r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_v)$"],
    "flux_kontext": [r"transformer_blocks\.\d+\.attn\.(to_q|to_v)$"],
    "qwen_image_edit": [r"transformer_blocks\.\d+\.attn\.(to_q|to_v)$"],
    "qwen_image_edit_plus": [r"transformer_blocks\.\d+\.attn\.(to_q|to_v)$"],
    "flux2_klein": [r"transformer_blocks\.\d+\.attn\.(to_q|to_v)$"],
}


def tiny_config(family: str, output: str | os.PathLike, fast: bool = True, comfyui: str | os.PathLike | None = None, **sections):
    """A TrainConfig on the cached tiny base of ``family`` with synthetic data (tests, bench).
    ``sections`` are dicts per section, e.g. ``train={"max_steps": 5}``; ``comfyui``: the variant
    with ComfyUI's tokenizers (see :func:`build_tiny_base`)."""
    from .config import TrainConfig, apply, validate

    cfg = TrainConfig()
    cfg.name, cfg.output = f"tiny_{family}", str(output)
    folder = CACHE / (f"{family}_comfy" if comfyui else family)
    cfg.base.family, cfg.base.path = family, str(build_tiny_base(family, folder, comfyui=comfyui))
    cfg.base.resolution = 32
    if family.startswith("qwen_image_edit"):
        cfg.base.text_tokens = 128
        # small images for Qwen2.5-VL and the reference latent keep CPU tests fast; the acceptance tests set
        # None (ComfyUI's TextEncodeQwenImageEdit(Plus) sizes)
        cfg.base.vl_pixels, cfg.base.reference_pixels = 56 * 56, 32 * 32
    if comfyui and family in COMFY_TEXT_TOKENS:
        cfg.base.text_tokens = COMFY_TEXT_TOKENS[family]
    if fast:
        cfg.base.targets = FAST_TARGETS[family]
    cfg.data.n_train, cfg.data.n_val = 16, 2
    cfg.generator.rank, cfg.generator.alpha = 4, 4.0
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.train.log_every = 20, 4, 1e-3, 5
    apply(cfg, sections)
    validate(cfg)
    return cfg


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a seeded tiny diffusers base folder (tests/demo).")
    p.add_argument("family", choices=sorted(_BUILDERS))
    p.add_argument("folder")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_tiny_base(a.family, a.folder, a.seed))


if __name__ == "__main__":
    main()
