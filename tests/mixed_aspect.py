"""Mixed-aspect data and the helpers of the bucket parity tests (tests/test_buckets.py, tests/test_family_*.py).

    mixed_aspect_folders(root, n, seed=0) -> root         # root/target/NNN.png + .txt, root/control/NNN.png
    picture(width, height, seed) -> PIL image             # a seeded picture of that size
    as_comfy(pil) -> (1, H, W, 3)                         # as LoadImage gives it
    comfy_scaled(family, image, megapixels)               # the template's scale node, run in-process in ComfyUI
    trainer_row(adapter, pil, megapixels) -> (batch, enc) # the trainer's row (base.buckets template) and its encodings
    condition_encode_image(adapter, image, clip, vae, latent_format, tmp_path)
                                                          # HY-WU Condition Encode's image tokens for ComfyUI's image

Each pair is a synthetic example rendered at 96 px and cropped, source and target alike, to 3:2, 9:16 or 1:1 in
turn (every edit of the world is global or keeps what stays in the crop, so the cropped pair is still exact).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

RENDER = 96
ASPECTS = ((96, 64), (54, 96), (96, 96))  # (width, height): 3:2, 9:16, 1:1


def mixed_aspect_folders(root, n: int, seed: int = 0) -> Path:
    from trainer.synthetic import make_examples

    root = Path(root)
    if (root / "target" / f"{n - 1:03d}.txt").is_file():
        return root
    (root / "target").mkdir(parents=True, exist_ok=True)
    (root / "control").mkdir(exist_ok=True)
    for i, ex in enumerate(make_examples("train", n, seed=seed, resolution=RENDER)):
        w, h = ASPECTS[i % len(ASPECTS)]
        left, top = (RENDER - w) // 2, (RENDER - h) // 2
        box = (left, top, left + w, top + h)
        ex.source.crop(box).save(root / "control" / f"{i:03d}.png")
        ex.target.crop(box).save(root / "target" / f"{i:03d}.png")
        (root / "target" / f"{i:03d}.txt").write_text(ex.instruction)
    return root


def picture(width: int, height: int, seed: int = 0):
    """A smooth seeded picture (gradients + low-frequency colour + a little noise) of ``width`` x ``height``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    phase = rng.uniform(0, 6.28, 3)
    img = np.stack([0.5 + 0.4 * np.sin(3 * x + 2 * y + p) for p in phase], -1) + rng.normal(0, 0.03, (height, width, 3))
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), "RGB")


def as_comfy(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]


def comfy_scaled(family: str, image: torch.Tensor, megapixels: float | None = None) -> torch.Tensor:
    """ComfyUI's own scale node of the family's template (FluxKontextImageScale / ImageScaleToTotalPixels at the
    template's settings, ``megapixels`` if given), in-process; (1, H, W, 3) in and out."""
    import inspect

    import comfy_harness
    from trainer.buckets import template_scale

    nodes = comfy_harness.load_comfy_nodes()
    node = template_scale(family, megapixels)
    if node.kind == "kontext":
        return nodes["FluxKontextImageScale"].execute(image)[0]
    scale = nodes["ImageScaleToTotalPixels"]
    kwargs = {"upscale_method": node.method, "megapixels": node.megapixels, "resolution_steps": node.steps}
    taken = inspect.signature(scale.execute).parameters  # 0.3.75's node has no resolution_steps
    return scale.execute(image, **{k: v for k, v in kwargs.items() if k in taken})[0]


@torch.no_grad()
def trainer_row(adapter, pil, megapixels: float | None = None, instruction: str = "make it brighter"):
    """The row (source = target = ``pil``) as the trainer loads it with template buckets, and ``adapter.encode``'s
    encodings of it."""
    from trainer.buckets import template_scale
    from trainer.data import EditDataset, collate

    ds = EditDataset([{"source": pil, "target": pil, "instruction": instruction}], scale=template_scale(adapter.name, megapixels))
    batch = collate([ds.load(0, adapter.resolution)])
    return batch, adapter.encode(batch)


@torch.no_grad()
def condition_encode_image(adapter, image: torch.Tensor, clip, vae, latent_format, tmp_path) -> torch.Tensor:
    """HY-WU Condition Encode's image tokens for ``image`` (1, H, W, 3), with a generator file of ``adapter``'s spec."""
    from hywu_nodes.core import GeneratorConfig, HYWUGenerator, build_target_spec, save_generator
    from hywu_nodes.nodes.encode import encode_condition
    from hywu_nodes.nodes.load_generator import load_generator_handle

    path = tmp_path / f"bucket-parity-{adapter.name}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        spec = build_target_spec(adapter.denoiser, adapter.name, include=[r"to_q$"])
        save_generator(path, HYWUGenerator(GeneratorConfig.from_preset("tiny", rank=4, alpha=4.0), spec, adapter.condition_spec))
    handle = load_generator_handle(str(path))
    cond, _ = encode_condition(handle.condition_spec, image, "make it brighter", clip, vae=vae, model_latent_format=latent_format)
    return cond.tokens["image"]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
