#!/usr/bin/env python
"""Make the example workflows' source images and their Templates-dialog thumbnails.

* ``example_workflows/input/hywu_demo_input.png``: a validation image of the demo's synthetic
  edit world (trainer/synthetic.py) at the demo resolution, with the demo's tasks and seed
  (scripts/hywu_demo_core.py DemoSettings); the demo workflow edits it.
* ``example_workflows/input/hywu_example.png``: a synthetic scene at 512 px for the workflows
  of full-size bases (SD1.5 InstructPix2Pix, FLUX.1 Kontext).
* ``example_workflows/<title>.jpg``: one thumbnail per workflow (source image, instruction,
  base model), the file name ComfyUI's Templates dialog asks for.

The pack copies the input images into ComfyUI's input folder when ComfyUI starts (never over an
existing file). Rerun this after changing the demo world or a workflow:

    .venv/bin/python scripts/make_examples.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_workflows"
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(EXAMPLES)]

import build_api  # noqa: E402  (example_workflows/build_api.py)

EXAMPLE_RESOLUTION = 512
THUMB = 512
BASES = {  # what the thumbnail says each workflow needs
    "hywu_demo": "micro SD1.5 InstructPix2Pix trained by make demo (CPU)",
    "hywu_demo_two_edits": "two HY-WU edits chained, micro SD1.5 trained by make demo (CPU)",
    "hywu_edit_sd15_ip2p": "SD1.5 InstructPix2Pix + a HY-WU generator",
    "hywu_edit_flux_kontext": "FLUX.1 Kontext [dev] + a HY-WU generator",
    "hywu_edit_qwen_image_edit": "Qwen-Image-Edit + a HY-WU generator",
    "hywu_edit_qwen_image_edit_plus": "Qwen-Image-Edit-2509 / 2511 + a HY-WU generator",
    "hywu_edit_flux2_klein": "FLUX.2 [klein] 4B (base) + a HY-WU generator",
}


def demo_input() -> Image.Image:
    """Validation example 0 of the demo world, at the demo's resolution, tasks and seed."""
    from hywu_demo_core import DEMO_TASKS, WorldSettings

    from trainer import synthetic

    s = WorldSettings()
    return synthetic.make_examples("val", 1, seed=s.seed, resolution=s.resolution, tasks=DEMO_TASKS)[0].source


def example_input() -> Image.Image:
    """A synthetic scene at full-size-base resolution (the val image stream, seed 0)."""
    from trainer import synthetic

    return synthetic.make_examples("val", 1, seed=0, resolution=EXAMPLE_RESOLUTION)[0].source


def inputs() -> dict[str, Image.Image]:
    return {build_api.DEMO_IMAGE: demo_input(), build_api.EXAMPLE_IMAGE: example_input()}


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def thumbnail(name: str, source: Image.Image) -> Image.Image:
    """Source image on top, the instruction and the base model below."""
    wf = build_api.WORKFLOWS[name]
    edits = [n["inputs"]["instruction"] for n in wf.values() if n["class_type"] == "HYWUConditionEncode"]
    # typed in a String node linked to Condition Encode; chained edits are joined
    instruction = " + ".join(wf[e[0]]["inputs"]["value"] if isinstance(e, list) else e for e in edits)
    card = Image.new("RGB", (THUMB, THUMB), (24, 26, 32))
    side = 300
    pic = source.convert("RGB").resize((side, side), Image.NEAREST if source.width < side else Image.LANCZOS)
    card.paste(pic, ((THUMB - side) // 2, 24))
    draw = ImageDraw.Draw(card)
    big, small = ImageFont.load_default(size=30), ImageFont.load_default(size=20)
    y = 24 + side + 22
    for line in _wrap(draw, f"\u201c{instruction}\u201d", big, THUMB - 48)[:2]:
        draw.text((THUMB // 2, y), line, font=big, fill=(240, 240, 240), anchor="mt")
        y += 38
    for line in _wrap(draw, BASES[name], small, THUMB - 48)[:2]:
        draw.text((THUMB // 2, y + 6), line, font=small, fill=(160, 200, 255), anchor="mt")
        y += 26
    draw.text((THUMB - 14, THUMB - 12), "HY-WU", font=small, fill=(120, 120, 130), anchor="rb")
    return card


def main() -> None:
    images = inputs()
    (EXAMPLES / "input").mkdir(exist_ok=True)
    for name, img in images.items():
        img.save(EXAMPLES / "input" / name, optimize=True)
        print(EXAMPLES / "input" / name, img.size)
    for name, title in build_api.TITLES.items():
        image_name = next(n["inputs"]["image"] for n in build_api.WORKFLOWS[name].values() if n["class_type"] == "LoadImage")
        path = EXAMPLES / f"{title}.jpg"
        thumbnail(name, images[image_name]).save(path, quality=85, optimize=True)
        print(path)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
