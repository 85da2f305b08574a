#!/usr/bin/env python
"""Build seeded HY-WU generator files for tests and the demo graph (no training, no downloads).

Outputs (in ``models/hywu/`` by default; git-ignored, rebuilt from the seed in ~1 s):

``hywu_micro_seeded.safetensors``
    For the micro SD1.5-InstructPix2Pix base (``scripts/build_micro_base.py``): target spec from
    the diffusers UNet in ``models/micro_sd15_ip2p/unet`` (``build_target_spec(unet,
    "sd15_ip2p")``), the standard SD1.5 condition spec (CLIP-L 77x768 + VAE latent of a 64 px
    image in 2x2 patches), preset ``tiny``, rank 4. The B head is given seeded non-zero
    weights, so the generated LoRAs are non-zero and depend on the instruction and the image
    (a freshly initialised generator writes B = 0, i.e. "no change").
``hywu_micro_seeded_shared.safetensors``
    The same with a shared rank of 2 (``generator.shared_rank``), its B given seeded non-zero
    weights too: for Generate LoRA's ``include_shared`` (the second edit of a chain).
``hywu_test_flux_kontext.safetensors``
    A generator for another base family (``flux_kontext``: target spec of a tiny seeded
    diffusers ``FluxTransformer2DModel``) with a Flux-style condition spec (T5 width 4096,
    16-channel latent). Condition Encode rejects it against an SD1.5 CLIP.
``hywu_test_flux_sd15cond.safetensors``
    Flux target spec, but the SD1.5 condition spec: it passes Condition Encode and Generate
    LoRA with the micro SD1.5 encoders, so HY-WU Apply Generated LoRA must find zero matching
    keys in an SD1.5 model and say which family the generator was trained for.

CLI::

    python scripts/build_test_generator.py [--out models/hywu] [--base models/micro_sd15_ip2p]
        [--seed 0] [--b-std 0.02] [--force]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "models" / "hywu"
DEFAULT_BASE = REPO / "models" / "micro_sd15_ip2p"
SEEDED_NAME = "hywu_micro_seeded.safetensors"
SEEDED_SHARED_NAME = "hywu_micro_seeded_shared.safetensors"
FLUX_NAME = "hywu_test_flux_kontext.safetensors"
FLUX_SD15COND_NAME = "hywu_test_flux_sd15cond.safetensors"

SD15_TEXT_WIDTH, SD15_TEXT_TOKENS, SD15_LATENT_CHANNELS = 768, 77, 4
IMAGE_RESOLUTION = 64
RANK, ALPHA = 4, 4.0
SHARED_RANK = 2


def sd15_condition_spec(image_resolution: int = IMAGE_RESOLUTION):
    from hywu_nodes.core import standard_condition_spec

    return standard_condition_spec(SD15_TEXT_WIDTH, SD15_TEXT_TOKENS, SD15_LATENT_CHANNELS, image_resolution)


def _seed_b_head_(generator, seed: int, b_std: float):
    """Give the zero-initialised B head seeded non-zero weights (so LoRAs are not all zero)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w = generator.head_b.weight
        w.copy_(torch.randn(w.shape, generator=g) * b_std)
        generator.head_b.bias.zero_()
    return generator


def _build(target_spec, cond_spec, seed: int, b_std: float, extra: dict, path: Path, shared_rank: int = 0):
    import torch

    from hywu_nodes.core import GeneratorConfig, HYWUGenerator, save_generator

    torch.manual_seed(seed)
    cfg = GeneratorConfig.from_preset("tiny", rank=RANK, alpha=ALPHA, shared_rank=shared_rank)
    gen = HYWUGenerator(cfg, target_spec, cond_spec)
    _seed_b_head_(gen, seed, b_std)
    if shared_rank:  # the shared B starts at zero too
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 1)
            for b in gen.shared_b:
                b.copy_(torch.randn(b.shape, generator=g) * b_std)
    save_generator(path, gen, extra={"seeded": True, "seed": seed, "b_std": b_std, **extra})
    return path


def micro_unet_target_spec(base_dir: Path):
    from diffusers import UNet2DConditionModel

    from hywu_nodes.core import build_target_spec

    unet = UNet2DConditionModel.from_pretrained(str(Path(base_dir) / "unet"))
    return build_target_spec(unet, "sd15_ip2p")


def tiny_flux_target_spec(seed: int = 0):
    import torch
    from diffusers import FluxTransformer2DModel

    from hywu_nodes.core import build_target_spec

    torch.manual_seed(seed)
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    )
    return build_target_spec(flux, "flux_kontext")


def _usable(path: Path) -> bool:
    """The file exists and loads with the current core (the generator layout may have changed)."""
    from hywu_nodes.core import GeneratorFileError, load_generator

    if not path.is_file():
        return False
    try:
        load_generator(path)
        return True
    except (GeneratorFileError, ValueError, KeyError, TypeError):
        return False


def build_test_generators(out_dir=DEFAULT_OUT, base_dir=DEFAULT_BASE, seed: int = 0, b_std: float = 0.02,
                          force: bool = False) -> dict[str, Path]:
    """Write the four generator files (skipping existing ones unless ``force``); returns their paths."""
    from hywu_nodes.core import standard_condition_spec

    out_dir = Path(out_dir)
    paths = {"seeded": out_dir / SEEDED_NAME, "seeded_shared": out_dir / SEEDED_SHARED_NAME,
             "flux": out_dir / FLUX_NAME, "flux_sd15cond": out_dir / FLUX_SD15COND_NAME}
    if force or not _usable(paths["seeded"]) or not _usable(paths["seeded_shared"]):
        if not (Path(base_dir) / "unet" / "config.json").is_file():
            sys.path.insert(0, str(REPO / "scripts"))
            import build_micro_base

            build_micro_base.ensure_micro_base()
        unet_spec, extra = micro_unet_target_spec(base_dir), {"base": "micro_sd15_ip2p",
                                                              "builder": "scripts/build_test_generator.py"}
        _build(unet_spec, sd15_condition_spec(), seed, b_std, extra, paths["seeded"])
        _build(unet_spec, sd15_condition_spec(), seed, b_std, extra, paths["seeded_shared"], SHARED_RANK)
    if force or not _usable(paths["flux"]) or not _usable(paths["flux_sd15cond"]):
        flux_spec = tiny_flux_target_spec(seed)
        _build(flux_spec, standard_condition_spec(4096, 512, 16, IMAGE_RESOLUTION), seed, b_std,
               {"base": "tiny_flux_kontext", "builder": "scripts/build_test_generator.py"}, paths["flux"])
        _build(flux_spec, sd15_condition_spec(), seed, b_std,
               {"base": "tiny_flux_kontext", "builder": "scripts/build_test_generator.py"}, paths["flux_sd15cond"])
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--base", default=str(DEFAULT_BASE), help="micro base diffusers folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--b-std", type=float, default=0.02, help="std of the seeded B-head weights")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.time()
    for k, p in build_test_generators(a.out, a.base, a.seed, a.b_std, a.force).items():
        print(f"{k}: {p}")
    print(f"({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
