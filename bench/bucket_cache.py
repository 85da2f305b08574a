#!/usr/bin/env python
"""The row cache with template buckets: encode time and disk size per 1,000 rows, and what a full-size run keeps.

Measured on the tiny seeded bases (trainer/tiny_bases.py): a mixed-aspect folder dataset (tests/mixed_aspect.py:
the synthetic world cropped to 3:2, 9:16 and 1:1) is encoded once by the trainer's EncodedRows and written to
its data.cache_dir file, with base.buckets square (the baseline, in the same run) and template (at
--megapixels). Prints JSON: per family, seconds and MB per 1,000 rows for both, their ratio, and the buckets.

The full-size part is arithmetic, not a measurement: the bytes a row keeps in bf16 at a family's template
size (``full_size_row_bytes``), and what --full-rows rows need against data.cache_mb. A dataset that does not
fit data.cache_mb is encoded batch by batch instead (trainer/encoded.py says so in the log).

    python bench/bucket_cache.py [--rows 300] [--megapixels 0.01] [--families sd15_ip2p,qwen_image_edit,flux2_klein]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

from mixed_aspect import mixed_aspect_folders  # noqa: E402

BF16 = 2
# Full-size shapes per family: latent channels and VAE downscale of the base's latent, text tokens x width
# the cache keeps per row (Qwen: the image tokens + instruction, for the instruction and the empty negative).
FULL = {
    "sd15_ip2p": {"channels": 4, "down": 8, "text": 77 * 768, "megapixels": 0.25, "resolution": 256},
    "flux_kontext": {"channels": 16, "down": 8, "text": 256 * 4096 + 768, "megapixels": 1.0, "resolution": 1024},
    "qwen_image_edit": {"channels": 16, "down": 8, "text": 2 * (1337 + 40) * 3584, "megapixels": 1.0, "resolution": 1024,
                        "reference_pixels": 1024 * 1024},
    "qwen_image_edit_plus": {"channels": 16, "down": 8, "text": 2 * (188 + 60) * 3584, "megapixels": 1.0, "resolution": 1024,
                             "reference_pixels": 1024 * 1024},
    "flux2_klein": {"channels": 128, "down": 16, "text": 512 * 7680, "megapixels": 1.0, "resolution": 1024},
}


def full_size_row_bytes(family: str, aspect: float = 1.5, resolution: int | None = None) -> dict:
    """Bytes one row keeps in the cache at full size (bf16), template buckets at the template's megapixels, a
    source of ``aspect`` (w/h): the base's source and target latents, the generator's square condition latent
    (``resolution``; Qwen keeps only this one source latent), the reference (Qwen) and the text features."""
    f = FULL[family]
    pixels = f["megapixels"] * 1024 * 1024
    w, h = (pixels * aspect) ** 0.5, (pixels / aspect) ** 0.5
    latent = f["channels"] * int(w // f["down"]) * int(h // f["down"]) * BF16
    r = resolution or f["resolution"]
    condition = f["channels"] * (r // f["down"]) ** 2 * BF16
    parts = {"target": latent, "condition_source": condition, "text": f["text"] * BF16}
    if family.startswith("qwen"):
        parts["reference"] = f["channels"] * f["reference_pixels"] // f["down"] ** 2 * BF16
    else:
        parts["source"] = latent
    parts["total"] = sum(parts.values())
    return parts


def measure(family: str, data: Path, buckets: str, megapixels: float, out: Path) -> dict:
    from trainer.data import build_datasets
    from trainer.encoded import EncodedRows, cache_key
    from trainer.families import load_family
    from trainer.tiny_bases import tiny_config

    base = {"buckets": buckets, **({"megapixels": megapixels} if buckets == "template" else {})}
    cfg = tiny_config(family, out / "run", base=base,
                      data={"source": "folders", "path": str(data), "n_train": None, "val_fraction": 0.0,
                            "cache_dir": str(out / f"cache-{family}-{buckets}")})
    adapter = load_family(cfg, torch.device("cpu"), torch.float32)
    train, _ = build_datasets(cfg)
    path = Path(cfg.data.cache_dir) / f"encoded-{cache_key(cfg, torch.float32)}.safetensors"
    t0 = time.perf_counter()
    rows = EncodedRows(adapter, train, cfg.base.resolution, max_mb=1e9).fill(path)
    seconds = time.perf_counter() - t0
    n = len(rows.rows)
    sizes = {tuple(v[1].shape[-2:]) for v in rows.rows.values()}
    return {"rows": n, "seconds": round(seconds, 2), "s_per_1000_rows": round(seconds / n * 1000, 1),
            "mb_per_1000_rows": round(path.stat().st_size / n * 1000 / 2**20, 2), "target_latent_sizes": sorted(sizes)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--megapixels", type=float, default=0.01, help="the template buckets' size on the tiny bases")
    ap.add_argument("--families", default="sd15_ip2p,qwen_image_edit,flux2_klein")
    ap.add_argument("--full-rows", type=int, default=10_000, help="rows of the full-size arithmetic")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    result: dict = {"rows": a.rows, "megapixels": a.megapixels, "tiny": {}, "full_size": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = mixed_aspect_folders(Path(tmp) / "pairs", a.rows)
        for family in a.families.split(","):
            square = measure(family, data, "square", a.megapixels, Path(tmp))
            template = measure(family, data, "template", a.megapixels, Path(tmp))
            result["tiny"][family] = {"square": square, "template": template,
                                      "time_ratio": round(template["seconds"] / square["seconds"], 2),
                                      "size_ratio": round(template["mb_per_1000_rows"] / square["mb_per_1000_rows"], 2)}
    for family in FULL:
        row = full_size_row_bytes(family)
        result["full_size"][family] = {"mb_per_row": round(row["total"] / 2**20, 2),
                                       "gb_for_rows": round(row["total"] * a.full_rows / 2**30, 1),
                                       "parts_mb": {k: round(v / 2**20, 2) for k, v in row.items() if k != "total"}}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
