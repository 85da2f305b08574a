"""Write docs/icon.png, the pack's Comfy Registry icon ([tool.comfy] Icon in pyproject.toml).

The picture is the method in one glance: a grid of rank-anchored parameter tokens (the LoRA a
generator writes), each request lighting it differently. Drawn with PIL from fixed numbers, so
rerunning gives the same file. Usage: python scripts/hywu_make_icon.py [out.png]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 256
OUT = Path(__file__).resolve().parents[1] / "docs" / "icon.png"


def draw() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (18, 22, 38))
    d = ImageDraw.Draw(img)
    n, pad, gap = 6, 28, 8
    cell = (SIZE - 2 * pad - (n - 1) * gap) / n
    for i in range(n):  # layer axis (rows) x in-layer position (columns)
        for j in range(n):
            w = 0.5 + 0.5 * math.sin(1.3 * i + 0.9 * j)  # one "generated" update
            color = (int(40 + 200 * w), int(90 + 120 * (1 - w)), int(220 - 60 * w))
            x0, y0 = pad + j * (cell + gap), pad + i * (cell + gap)
            d.rounded_rectangle([x0, y0, x0 + cell, y0 + cell], radius=5, fill=color)
    d.rounded_rectangle([6, 6, SIZE - 7, SIZE - 7], radius=28, outline=(235, 240, 255), width=4)
    return img.quantize(colors=32)  # a palette PNG: a few KB


def main(argv=None) -> None:
    out = Path((argv or sys.argv[1:] or [str(OUT)])[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    draw().save(out, optimize=True)
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
