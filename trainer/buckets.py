"""Aspect-ratio buckets: a row's images at the size the family's shipped template gives the base.

With ``base.buckets: template`` a training row is not cropped to a square: its source goes through
the same scale node as in the template (example_workflows/build_api.py), computed as ComfyUI computes
it, and its target is brought to that size; rows of one size form a bucket, and a batch is drawn
from one bucket (trainer.data.BatchStream). The nodes, mirrored here:

* ``FluxKontextImageScale`` (flux_kontext): the preferred Kontext resolution nearest the source's
  aspect ratio, centre crop to it, lanczos;
* ``ImageScaleToTotalPixels`` (sd15_ip2p, the Qwen families, flux2_klein): the aspect kept at
  ``megapixels`` (``base.megapixels``, default the template's), sides rounded to ``resolution_steps``,
  no crop, the template's interpolation.

The VAE then crops the pixels to a multiple of its downscale factor, centred, as ComfyUI's
``VAE.encode`` does (``vae_crop``). The generator's image condition is not bucketed: it stays
``square_resize(image, base.resolution)`` of the scaled image, which is what HY-WU Condition Encode
computes in the template.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BUCKET_MODES = ("square", "template")

# comfy_extras/nodes_flux.py PREFERRED_KONTEXT_RESOLUTIONS, (width, height)
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672))


@dataclass(frozen=True)
class ScaleNode:
    """The template's image scale node: ``kind`` kontext (FluxKontextImageScale) or total_pixels
    (ImageScaleToTotalPixels with ``method``, ``megapixels``, ``steps`` = its resolution_steps)."""
    kind: str
    method: str = "lanczos"
    megapixels: float = 1.0
    steps: int = 1

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the node gives an image of ``width`` x ``height``."""
        if self.kind == "kontext":
            aspect = width / height
            _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
            return w, h
        scale = math.sqrt(self.megapixels * 1024 * 1024 / (width * height))
        return (round(width * scale / self.steps) * self.steps, round(height * scale / self.steps) * self.steps)

    def crop(self) -> str:
        return "center" if self.kind == "kontext" else "disabled"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the node's output, (B, 3, H', W')."""
        w, h = self.size(images.shape[-1], images.shape[-2])
        return common_upscale(images, w, h, self.method, self.crop())


# The shipped templates' scale nodes (example_workflows/build_api.py; tests/test_workflows.py checks they agree).
TEMPLATE_SCALE = {
    "sd15_ip2p": ScaleNode("total_pixels", "lanczos", 0.25),
    "flux_kontext": ScaleNode("kontext"),
    "qwen_image_edit": ScaleNode("total_pixels", "lanczos", 1.0),
    "qwen_image_edit_plus": ScaleNode("total_pixels", "lanczos", 1.0),
    "flux2_klein": ScaleNode("total_pixels", "nearest-exact", 1.0),
}
# What ComfyUI's VAE.encode crops the pixels to a multiple of (its spacial compression).
VAE_MULTIPLE = {"sd15_ip2p": 8, "flux_kontext": 8, "qwen_image_edit": 8, "qwen_image_edit_plus": 8, "flux2_klein": 16}


def template_scale(family: str, megapixels: float | None = None) -> ScaleNode:
    """The family's template scale node, at ``megapixels`` where it has that setting (None: the template's)."""
    node = TEMPLATE_SCALE[family]
    if megapixels is not None and node.kind == "total_pixels":
        node = ScaleNode(node.kind, node.method, float(megapixels), node.steps)
    return node


def file_record(cfg) -> dict:
    """What a generator file records of its training sizes (``hywu.extra``, shown by the loader): the
    template scale node of a bucketed run, so the template can be set to the same."""
    if cfg.base.buckets != "template":
        return {}
    node = template_scale(cfg.base.family, cfg.base.megapixels)
    what = "FluxKontextImageScale" if node.kind == "kontext" else f"ImageScaleToTotalPixels {node.method} {node.megapixels:g} MP"
    return {"trained_image_scale": what}


def lanczos(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """comfy.utils.lanczos: through 8-bit PIL images (truncated, not rounded), PIL's LANCZOS."""
    out = []
    for im in images:
        pil = Image.fromarray(np.clip(255.0 * im.movedim(0, -1).cpu().numpy(), 0, 255).astype(np.uint8))
        arr = np.array(pil.resize((width, height), resample=Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
        out.append(torch.from_numpy(arr).movedim(-1, 0))
    return torch.stack(out).to(images.device, images.dtype)


def common_upscale(images: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """comfy.utils.common_upscale for (B, C, H, W) images: an optional centre crop to the new aspect,
    then lanczos or torch interpolation."""
    if crop == "center":
        old_w, old_h = images.shape[-1], images.shape[-2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        images = images.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
    if method == "lanczos":
        return lanczos(images, width, height)
    return F.interpolate(images, size=(height, width), mode=method)


def vae_crop(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pixels cropped to a multiple of ``multiple`` per side, centred, as ComfyUI's VAE.encode crops them."""
    for dim in (-2, -1):
        n = images.shape[dim]
        keep = n // multiple * multiple
        if keep != n:
            images = images.narrow(dim, (n % multiple) // 2, keep)
    return images


def fit_target(target: torch.Tensor, width: int, height: int, node: ScaleNode) -> torch.Tensor:
    """The target at the source's bucket size: through the node when it has the source's size (then it is
    treated exactly as the source), else centre-cropped to the bucket's aspect and resized with the node's
    interpolation."""
    if node.size(target.shape[-1], target.shape[-2]) == (width, height):
        return common_upscale(target, width, height, node.method, node.crop())
    return common_upscale(target, width, height, node.method, "center")
