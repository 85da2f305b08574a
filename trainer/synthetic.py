"""A synthetic image-edit world with exact targets and conflicting tasks.

Pure numpy + PIL (no torch), deterministic, fast (about 1000 examples/s at 64x64).

* Source images: procedurally drawn scenes (background colour / gradient / stripes / checker
  texture, 2-4 shapes of several kinds and colours, always a visible red and a visible blue
  shape so the recolour tasks have something to do), drawn from a seed.
* Tasks: ``apply_task(task, image)`` computes the exact target from the source image. Most tasks
  come in **conflicting pairs** (:data:`CONFLICT_PAIRS`) whose updates pull in opposite
  directions (brighten / darken, blur / sharpen, rotate cw / ccw, shift left / right,
  red->blue / blue->red, grow / shrink); two tasks have no partner (grayscale, flip).
* Instructions: several natural-language phrasings per task; :data:`PHRASINGS` splits them into
  ``"train"`` phrasings (used by the train and val splits) and ``"heldout"`` phrasings (worded in
  ways never seen in training; used only by the heldout_phrasing split).
* Splits (:func:`make_examples`):
    - ``"train"``: image stream 0, train phrasings;
    - ``"val"``: image stream 1 (never the train images), train phrasings;
    - ``"heldout_phrasing"``: the *same* images and tasks as ``"val"`` (same seed and n), only
      the instruction is drawn from the held-out phrasings, so val vs heldout_phrasing isolates
      the effect of wording.
  Tasks cycle through the task list (example i has task ``tasks[i % len(tasks)]``), so every
  split is balanced per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "TASKS",
    "CONFLICT_PAIRS",
    "NON_CONFLICTING",
    "CONFLICT_PARTNER",
    "PHRASINGS",
    "SPLITS",
    "EditExample",
    "make_examples",
    "make_source",
    "apply_task",
    "instruction_for",
]

CONFLICT_PAIRS: tuple[tuple[str, str], ...] = (
    ("brighten", "darken"),
    ("blur", "sharpen"),
    ("rotate_cw", "rotate_ccw"),
    ("shift_left", "shift_right"),
    ("red_to_blue", "blue_to_red"),
    ("grow", "shrink"),
)
NON_CONFLICTING: tuple[str, ...] = ("grayscale", "flip_horizontal")
TASKS: tuple[str, ...] = tuple(t for pair in CONFLICT_PAIRS for t in pair) + NON_CONFLICTING
CONFLICT_PARTNER: dict[str, str] = {
    **{a: b for a, b in CONFLICT_PAIRS},
    **{b: a for a, b in CONFLICT_PAIRS},
}
SPLITS: tuple[str, ...] = ("train", "val", "heldout_phrasing")

# Short instructions (well under CLIP's 77 tokens). "heldout" wordings never occur in training:
# they are new sentences that reuse some of the task's content words ("brighter", "left",
# "red", ...) in unseen combinations, so a model can generalise to them through its text
# encoder (the demo's micro base has a random-weight CLIP, which only shares words, not meaning).
PHRASINGS: dict[str, dict[str, list[str]]] = {
    "brighten": {
        "train": ["brighten the image", "make it brighter", "increase the brightness",
                  "make the picture lighter", "turn up the brightness"],
        "heldout": ["could you make this photo a bit brighter", "please brighten everything"],
    },
    "darken": {
        "train": ["darken the image", "make it darker", "decrease the brightness",
                  "make the picture dimmer", "turn down the brightness"],
        "heldout": ["could you make this photo a bit darker", "please darken everything"],
    },
    "blur": {
        "train": ["blur the image", "make it blurry", "soften the picture",
                  "apply a blur", "make the picture out of focus"],
        "heldout": ["could you make this photo a bit blurry", "please blur everything"],
    },
    "sharpen": {
        "train": ["sharpen the image", "make it sharper", "crisp up the picture",
                  "apply sharpening", "make the edges crisper"],
        "heldout": ["could you make this photo a bit sharper", "please sharpen everything"],
    },
    "rotate_cw": {
        "train": ["rotate the image clockwise", "turn it 90 degrees clockwise",
                  "rotate right by a quarter turn", "spin the picture clockwise",
                  "rotate 90 degrees to the right"],
        "heldout": ["give this photo a clockwise quarter turn", "please rotate everything clockwise"],
    },
    "rotate_ccw": {
        "train": ["rotate the image counterclockwise", "turn it 90 degrees counterclockwise",
                  "rotate left by a quarter turn", "spin the picture anticlockwise",
                  "rotate 90 degrees to the left"],
        "heldout": ["give this photo a counterclockwise quarter turn",
                    "please rotate everything counterclockwise"],
    },
    "shift_left": {
        "train": ["shift the image left", "move everything to the left",
                  "slide the picture left", "move the scene leftwards", "pan left"],
        "heldout": ["could you move this photo a bit to the left", "please shift everything left"],
    },
    "shift_right": {
        "train": ["shift the image right", "move everything to the right",
                  "slide the picture right", "move the scene rightwards", "pan right"],
        "heldout": ["could you move this photo a bit to the right", "please shift everything right"],
    },
    "red_to_blue": {
        "train": ["make the red things blue", "recolor red to blue", "turn red into blue",
                  "change red objects to blue", "replace red with blue"],
        "heldout": ["could you paint the red shapes blue", "please swap red for blue"],
    },
    "blue_to_red": {
        "train": ["make the blue things red", "recolor blue to red", "turn blue into red",
                  "change blue objects to red", "replace blue with red"],
        "heldout": ["could you paint the blue shapes red", "please swap blue for red"],
    },
    "grow": {
        "train": ["zoom in", "make everything bigger", "enlarge the scene",
                  "scale the picture up", "magnify the image"],
        "heldout": ["could you zoom in on this photo a bit", "please make the shapes bigger"],
    },
    "shrink": {
        "train": ["zoom out", "make everything smaller", "shrink the scene",
                  "scale the picture down", "reduce the image size"],
        "heldout": ["could you zoom out of this photo a bit", "please make the shapes smaller"],
    },
    "grayscale": {
        "train": ["make it black and white", "convert to grayscale", "remove the color",
                  "desaturate the image", "make the picture monochrome"],
        "heldout": ["could you make this photo black and white", "please remove every color"],
    },
    "flip_horizontal": {
        "train": ["flip the image horizontally", "mirror the picture", "flip left to right",
                  "mirror it horizontally", "reflect the image horizontally"],
        "heldout": ["could you mirror this photo", "please flip everything horizontally"],
    },
}

# Task parameters (fixed; part of the world's definition).
BRIGHTNESS_DELTA = 48          # additive, in 0..255 units, clipped
BLUR_SIGMA = 1.2               # Gaussian blur (separable, radius 3, edge padding)
SHARPEN_AMOUNT = 1.5           # unsharp mask: x + a * (x - blur(x))
SHIFT_FRACTION = 1 / 8         # of the width (8 px at 64, one SD latent cell)
ZOOM = 1.25                    # grow = zoom in by ZOOM about the centre; shrink = 1 / ZOOM
RB_MARGIN = 48                 # "red" / "blue" pixel: that channel exceeds both others by this


@dataclass
class EditExample:
    source: Image.Image
    target: Image.Image
    instruction: str
    task: str


# ---------------------------------------------------------------- exact image operations

def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        a = np.asarray(image.convert("RGB"), dtype=np.uint8)
    else:
        a = np.asarray(image)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError("expected an HxWx3 uint8 array")
    return a


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gauss_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    xs = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (xs / sigma) ** 2)
    return k / k.sum()


def _blur_f(a: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Separable Gaussian blur with edge padding, float64 in and out."""
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    x = np.pad(a.astype(np.float64), ((r, r), (0, 0), (0, 0)), mode="edge")
    x = sum(k[i] * x[i:i + a.shape[0]] for i in range(len(k)))
    x = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="edge")
    x = sum(k[i] * x[:, i:i + a.shape[1]] for i in range(len(k)))
    return x


def _shift(a: np.ndarray, dx: int) -> np.ndarray:
    """Content moves by dx pixels (dx<0: left); the uncovered border repeats the edge column."""
    w = a.shape[1]
    if dx == 0:
        return a.copy()
    idx = np.clip(np.arange(w) - dx, 0, w - 1)
    return a[:, idx]


def _zoom(a: np.ndarray, factor: float) -> np.ndarray:
    """Bilinear zoom about the image centre (factor>1: content grows), edge-clamped sampling."""
    h, w = a.shape[:2]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    ys = cy + (np.arange(h, dtype=np.float64) - cy) / factor
    xs = cx + (np.arange(w, dtype=np.float64) - cx) / factor
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    f = a.astype(np.float64)
    top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
    bot = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


def _swap_rb_where(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = a.copy()
    out[mask, 0] = a[mask, 2]
    out[mask, 2] = a[mask, 0]
    return out


def _red_mask(a: np.ndarray) -> np.ndarray:
    r, g, b = (a[..., i].astype(np.int16) for i in range(3))
    return (r >= g + RB_MARGIN) & (r >= b + RB_MARGIN)


def _blue_mask(a: np.ndarray) -> np.ndarray:
    r, g, b = (a[..., i].astype(np.int16) for i in range(3))
    return (b >= r + RB_MARGIN) & (b >= g + RB_MARGIN)


def _op_brighten(a):
    return _to_u8(a.astype(np.int16) + BRIGHTNESS_DELTA)


def _op_darken(a):
    return _to_u8(a.astype(np.int16) - BRIGHTNESS_DELTA)


def _op_blur(a):
    return _to_u8(_blur_f(a))


def _op_sharpen(a):
    f = a.astype(np.float64)
    return _to_u8(f + SHARPEN_AMOUNT * (f - _blur_f(a)))


def _op_rotate_cw(a):
    return np.ascontiguousarray(np.rot90(a, k=-1))


def _op_rotate_ccw(a):
    return np.ascontiguousarray(np.rot90(a, k=1))


def _shift_px(a) -> int:
    return max(1, int(round(a.shape[1] * SHIFT_FRACTION)))


def _op_shift_left(a):
    return _shift(a, -_shift_px(a))


def _op_shift_right(a):
    return _shift(a, _shift_px(a))


def _op_red_to_blue(a):
    """Clearly red pixels (R exceeds G and B by RB_MARGIN) get R and B swapped: they become
    clearly blue, so blue_to_red undoes it exactly."""
    return _swap_rb_where(a, _red_mask(a))


def _op_blue_to_red(a):
    """Clearly blue pixels (B exceeds R and G by RB_MARGIN) get R and B swapped."""
    return _swap_rb_where(a, _blue_mask(a))


def _op_grow(a):
    return _to_u8(_zoom(a, ZOOM))


def _op_shrink(a):
    return _to_u8(_zoom(a, 1.0 / ZOOM))


def _op_grayscale(a):
    f = a.astype(np.float64)
    y = _to_u8(0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2])
    return np.repeat(y[..., None], 3, axis=2)


def _op_flip_horizontal(a):
    return np.ascontiguousarray(a[:, ::-1])


_OPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "brighten": _op_brighten, "darken": _op_darken,
    "blur": _op_blur, "sharpen": _op_sharpen,
    "rotate_cw": _op_rotate_cw, "rotate_ccw": _op_rotate_ccw,
    "shift_left": _op_shift_left, "shift_right": _op_shift_right,
    "red_to_blue": _op_red_to_blue, "blue_to_red": _op_blue_to_red,
    "grow": _op_grow, "shrink": _op_shrink,
    "grayscale": _op_grayscale, "flip_horizontal": _op_flip_horizontal,
}
assert set(_OPS) == set(TASKS) == set(PHRASINGS)


def apply_task(task: str, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """The exact target of ``task`` for ``image`` (same type out as in: PIL image or uint8 array)."""
    if task not in _OPS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    out = _OPS[task](_to_array(image))
    return Image.fromarray(out, "RGB") if isinstance(image, Image.Image) else out


# ---------------------------------------------------------------- source images

_PALETTE = {  # clearly red / blue / other-dominant colours
    "red": (220, 40, 40), "dark_red": (160, 20, 30), "orange_red": (230, 80, 50),
    "blue": (40, 60, 220), "navy": (25, 35, 150), "sky": (70, 130, 235),
    "green": (40, 180, 60), "yellow": (230, 210, 40), "white": (240, 240, 240),
    "purple": (150, 60, 170), "teal": (30, 160, 160),
}
_RED_BLUE = ("red", "dark_red", "orange_red", "blue", "navy", "sky")
_SHAPES = ("circle", "square", "triangle", "ring", "bar", "diamond")


def _background(rng: np.random.Generator, res: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    kind = rng.integers(0, 4)
    base = rng.integers(50, 200, size=3).astype(np.float64)
    # keep backgrounds greyish (channel spread < RB_MARGIN) so only shapes are red or blue
    base = 0.7 * base.mean() + 0.3 * base
    img = np.broadcast_to(base, (res, res, 3)).copy()
    if kind == 1:  # linear gradient
        ang = rng.uniform(0, 2 * np.pi)
        t = (np.cos(ang) * xx + np.sin(ang) * yy)  # in about -1..1
        other = rng.integers(30, 220, size=3).astype(np.float64)
        other = 0.7 * other.mean() + 0.3 * other
        img = base + (other - base) * ((t[..., None] + 1.0) / 2.0)
    elif kind == 2:  # stripes
        period = rng.uniform(0.15, 0.5)
        ang = rng.uniform(0, np.pi)
        t = np.cos(ang) * xx + np.sin(ang) * yy
        s = (np.floor(t / period) % 2)[..., None]
        img = base + s * rng.uniform(-45, 45)
    elif kind == 3:  # checker texture
        period = rng.uniform(0.2, 0.5)
        s = ((np.floor(xx / period) + np.floor(yy / period)) % 2)[..., None]
        img = base + s * rng.uniform(-40, 40)
    return img


def _shape_mask(kind: str, yy, xx, cy, cx, size, ang) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(ang), np.sin(ang)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == "circle":
        return dx * dx + dy * dy <= size * size
    if kind == "ring":
        r2 = dx * dx + dy * dy
        return (r2 <= size * size) & (r2 >= (0.55 * size) ** 2)
    if kind == "square":
        return (np.abs(u) <= size * 0.85) & (np.abs(v) <= size * 0.85)
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= size * 1.1
    if kind == "bar":
        return (np.abs(u) <= size * 1.3) & (np.abs(v) <= size * 0.35)
    if kind == "triangle":
        # upward triangle in the rotated frame
        return (v <= size * 0.8) & (v >= -size) & (np.abs(u) <= (v + size) * 0.6)
    raise ValueError(kind)


def make_source(rng: np.random.Generator, resolution: int = 64) -> np.ndarray:
    """One random scene as an HxWx3 uint8 array.

    A background plus 2-4 shapes; the last two are one red-family and one blue-family shape (in
    random order), and the scene is redrawn until both red and blue pixels are visible, so the
    recolour tasks are never no-ops.
    """
    res = int(resolution)
    coords = (np.arange(res, dtype=np.float64) + 0.5) / res * 2.0 - 1.0  # pixel centres in -1..1
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    names = list(_PALETTE)
    reds, blues = _RED_BLUE[:3], _RED_BLUE[3:]
    while True:
        img = _background(rng, res, yy, xx)
        n_shapes = int(rng.integers(2, 5))
        last_two = [reds[rng.integers(3)], blues[rng.integers(3)]]
        if rng.integers(2):
            last_two.reverse()
        colours = [names[rng.integers(len(names))] for _ in range(n_shapes - 2)] + last_two
        for cname in colours:
            colour = np.array(_PALETTE[cname], dtype=np.float64) + rng.uniform(-15, 15, size=3)
            kind = _SHAPES[rng.integers(len(_SHAPES))]
            size = rng.uniform(0.18, 0.42)
            cy, cx = rng.uniform(-0.6, 0.6, size=2)
            ang = rng.uniform(0, 2 * np.pi)
            m = _shape_mask(kind, yy, xx, cy, cx, size, ang)
            img[m] = colour
        out = _to_u8(img)
        if _red_mask(out).any() and _blue_mask(out).any():
            return out


# ---------------------------------------------------------------- examples / splits

_STREAM = {"train": 0, "val": 1, "heldout_phrasing": 1}   # heldout_phrasing reuses val images
_PHRASE_KIND = {"train": "train", "val": "train", "heldout_phrasing": "heldout"}


def instruction_for(task: str, kind: str, rng: np.random.Generator) -> str:
    """A random phrasing of ``task`` from the ``"train"`` or ``"heldout"`` wordings."""
    options = PHRASINGS[task][kind]
    return options[int(rng.integers(len(options)))]


def _example_rngs(split: str, seed: int, i: int) -> tuple[np.random.Generator, np.random.Generator]:
    image_rng = np.random.default_rng([int(seed), _STREAM[split], int(i), 0])
    phrase_rng = np.random.default_rng([int(seed), _STREAM[split], int(i), 1 + SPLITS.index(split)])
    return image_rng, phrase_rng


def make_examples(split: str, n: int, seed: int = 0, resolution: int = 64,
                  tasks: Sequence[str] | None = None, start: int = 0) -> list[EditExample]:
    """``n`` deterministic examples of ``split`` ("train", "val" or "heldout_phrasing").

    Example i (counting from ``start``) has task ``tasks[i % len(tasks)]`` (all :data:`TASKS`
    by default), a source image drawn from the split's own image stream (train and val never
    share one; heldout_phrasing has val's images) and a phrasing drawn from the split's wordings.
    The same (split, seed, resolution, tasks, i) always gives the same example, so
    ``make_examples(s, 10)[5:]`` equals ``make_examples(s, 5, start=5)``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    task_list = tuple(TASKS if tasks is None else tasks)
    unknown = [t for t in task_list if t not in _OPS]
    if unknown or not task_list:
        raise ValueError(f"unknown or empty task list: {unknown or task_list}")
    kind = _PHRASE_KIND[split]
    out = []
    for i in range(int(start), int(start) + int(n)):
        image_rng, phrase_rng = _example_rngs(split, seed, i)
        task = task_list[i % len(task_list)]
        src = make_source(image_rng, resolution)
        tgt = _OPS[task](src)
        out.append(EditExample(
            source=Image.fromarray(src, "RGB"),
            target=Image.fromarray(tgt, "RGB"),
            instruction=instruction_for(task, kind, phrase_rng),
            task=task,
        ))
    return out

