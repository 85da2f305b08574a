"""A synthetic image-edit world with exact targets, conflicting tasks and a vocabulary of its own.

Pure numpy + PIL (no torch), deterministic, fast (thousands of examples/s at 32x32).

* **Source images**: smooth procedural scenes drawn from a seed: a two-colour linear gradient
  background and 1-3 large soft-edged shapes (discs, ellipses, rounded squares) in saturated
  mid-tone colours. The structures are large and smooth on purpose: an SD-style VAE keeps one
  latent cell per 8x8 pixels, and the world must be something that latent grid can carry.
* **Tasks**: ``apply_task(task, image)`` computes the exact target from the source image.
  :data:`BASE_TASKS` are what the demo's frozen base model ("foundation model") is pretrained on.
  :data:`ADAPTER_TASKS` are what adapters learn on top of it: four **conflicting pairs**
  (:data:`CONFLICT_PAIRS`: brighten / darken, warm / cool, shift left / right, hue forward /
  backward) whose edits pull the same pixels in opposite directions, plus two tasks without a
  partner (:data:`NON_CONFLICTING`). The base was never pretrained on the conflicting pairs.
* **Instructions** come from a small grammar: a task's *core* phrases in sentence *frames*
  ("please {core}", "can you {core}"). :data:`PHRASINGS` holds every sentence per task,
  split into ``"train"`` sentences (train frames x train cores), ``"heldout"`` sentences
  (frames and cores never seen in training, built from the world's vocabulary) and ``"dev"``
  sentences (shaped like the held-out ones, sharing no frame or core with either: for choosing
  settings).
* **Splits** (:func:`make_examples`): ``"train"`` (image stream 0, train sentences), ``"val"``
  (image stream 1, never a training image, train sentences), ``"heldout_phrasing"`` (val's images
  and tasks, held-out sentences only: val vs heldout_phrasing differs in the wording alone),
  ``"dev_phrasing"`` (val's images and tasks, dev sentences only: choose settings on it, never
  on heldout_phrasing).
  Tasks cycle through the task list, so every split is balanced.
* **Composed edits** (:data:`COMPOSED_TASKS`, e.g. ``"brighten+shift_left"``: "make it brighter and
  shift the image left"): two tasks of different kinds in one instruction; the exact target applies
  both, in the name's order. :data:`COMPOSED_TRAIN` / :data:`COMPOSED_HELDOUT` split them so that a
  held-out combination's tasks are each trained in other combinations, never together. They are
  not in :data:`TASKS`: the demo's default data is unchanged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "TASKS", "BASE_TASKS", "ADAPTER_TASKS", "CONFLICT_PAIRS", "NON_CONFLICTING", "CONFLICT_PARTNER",
    "PHRASINGS", "SPLITS", "EditExample", "make_examples", "make_source", "apply_task", "instruction_for",
    "COMPOSED_TASKS", "COMPOSED_TRAIN", "COMPOSED_HELDOUT", "COMPOSED_PHRASINGS", "compose", "parts",
]

CONFLICT_PAIRS: tuple[tuple[str, str], ...] = (
    ("brighten", "darken"),
    ("warm", "cool"),
    ("shift_left", "shift_right"),
    ("hue_forward", "hue_backward"),
)
NON_CONFLICTING: tuple[str, ...] = ("grayscale", "sepia")
ADAPTER_TASKS: tuple[str, ...] = tuple(t for pair in CONFLICT_PAIRS for t in pair) + NON_CONFLICTING
# What the foundation model knows. grayscale is in both: the adapters must keep what the base does.
BASE_TASKS: tuple[str, ...] = ("grayscale", "invert", "swap_red_blue", "shift_up", "shift_down")
TASKS: tuple[str, ...] = ADAPTER_TASKS + tuple(t for t in BASE_TASKS if t not in ADAPTER_TASKS)
CONFLICT_PARTNER: dict[str, str] = {**{a: b for a, b in CONFLICT_PAIRS}, **{b: a for a, b in CONFLICT_PAIRS}}
# New splits go at the end: a split's index seeds its phrasing stream (_example_rngs).
SPLITS: tuple[str, ...] = ("train", "val", "heldout_phrasing", "dev_phrasing")

# Task parameters (fixed; part of the world's definition).
BRIGHTNESS_DELTA = 48   # brighten / darken: added to every channel (0..255), clipped
WARMTH_DELTA = 40       # warm: red +, blue -; cool: the opposite
SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])

# ------------------------------------------------------------------------------ instructions

# Core phrases per task. Train cores are what training sentences use; held-out cores are new
# sentences made of the same task words (the text encoder can only know words it has seen).
# Dev cores are a third set shaped like the held-out ones (a "the ... should ..." sentence and
# two noun phrases per task, most with the deciding word last; long polite frames) so that dev
# predicts held-out difficulty. None of them (nor a dev frame) is a train or held-out one, so the
# held-out sentences stay unseen by every choice. (The first dev set, short train-like phrases,
# lost 0.4 dB from val where held-out lost 2.2: it did not predict the held-out split.)
_CORES: dict[str, dict[str, list[str]]] = {
    "brighten": {
        "train": ["make it brighter", "brighten the image", "increase the brightness", "make the picture lighter",
                  "raise the brightness", "more light"],
        "heldout": ["the image should be brighter", "lighter picture", "brighter scene"],
        "dev": ["the picture should be lighter", "lighter scene", "brighter photo"],
    },
    "darken": {
        "train": ["make it darker", "darken the image", "decrease the brightness", "make the picture dimmer",
                  "lower the brightness", "less light"],
        "heldout": ["the image should be darker", "dimmer picture", "darker scene"],
        "dev": ["the picture should be dimmer", "dimmer scene", "darker photo"],
    },
    "warm": {
        "train": ["make it warmer", "warm the colors", "give it a warm tone", "add warmth",
                  "shift the colors toward orange", "warmer colors"],
        "heldout": ["the image should be warmer", "warm tone picture", "orange warmth"],
        "dev": ["the colors should be warmer", "warm tone photo", "orange tone picture"],
    },
    "cool": {
        "train": ["make it cooler", "cool the colors", "give it a cool tone", "add coolness",
                  "shift the colors toward teal", "cooler colors"],
        "heldout": ["the image should be cooler", "cool tone picture", "teal coolness"],
        "dev": ["the colors should be cooler", "cool tone photo", "teal tone picture"],
    },
    "shift_left": {
        "train": ["shift the image left", "move everything to the left", "slide the picture left",
                  "move the scene leftwards", "pan left", "push the content left"],
        "heldout": ["the image should move left", "left shift of the picture", "content to the left"],
        "dev": ["the picture should move left", "left shift of the scene", "everything to the left"],
    },
    "shift_right": {
        "train": ["shift the image right", "move everything to the right", "slide the picture right",
                  "move the scene rightwards", "pan right", "push the content right"],
        "heldout": ["the image should move right", "right shift of the picture", "content to the right"],
        "dev": ["the picture should move right", "right shift of the scene", "everything to the right"],
    },
    "hue_forward": {
        "train": ["rotate the hue forward", "cycle the colors forward", "turn the hues forward",
                  "hue shift forward", "spin the color wheel forward", "advance the hue"],
        "heldout": ["the hue should go forward", "forward hue rotation", "colors cycled forward"],
        "dev": ["the colors should go forward", "forward color rotation", "hues cycled forward"],
    },
    "hue_backward": {
        "train": ["rotate the hue backward", "cycle the colors backward", "turn the hues backward",
                  "hue shift backward", "spin the color wheel backward", "reverse the hue"],
        "heldout": ["the hue should go backward", "backward hue rotation", "colors cycled backward"],
        "dev": ["the colors should go backward", "backward color rotation", "hues cycled backward"],
    },
    "grayscale": {
        "train": ["make it black and white", "convert to grayscale", "remove the color", "desaturate the image",
                  "make the picture monochrome", "drain all color"],
        "heldout": ["the image should be black and white", "monochrome picture", "the picture in black and white"],
        "dev": ["the picture should be monochrome", "monochrome image", "black and white photo"],
    },
    "sepia": {
        "train": ["make it sepia", "give it a sepia tone", "apply a sepia filter", "make it look like an old photo",
                  "add an antique brown tint", "vintage sepia look"],
        "heldout": ["the image should be sepia", "old photo look", "antique sepia picture"],
        "dev": ["the picture should be sepia", "old picture look", "antique brown photo"],
    },
    "invert": {
        "train": ["invert the colors", "make a negative", "turn it into a negative", "reverse all colors",
                  "invert the image", "photo negative"],
        "heldout": ["the image should be a negative", "negative picture", "invert every color"],
        "dev": ["the picture should be a negative", "negative image", "a negative photo"],
    },
    "swap_red_blue": {
        "train": ["swap red and blue", "exchange the red and blue channels", "switch red with blue",
                  "trade red for blue", "flip the red and blue channels", "red and blue swapped"],
        "heldout": ["the red and blue should swap", "blue for red exchange", "swap the blue and red"],
        "dev": ["the blue and red should swap", "red for blue exchange", "exchange the blue and red"],
    },
    "shift_up": {
        "train": ["shift the image up", "move everything up", "slide the picture up", "move the scene upwards",
                  "pan up", "push the content up"],
        "heldout": ["the image should move up", "up shift of the picture", "content upwards"],
        "dev": ["the picture should move up", "up shift of the scene", "everything upwards"],
    },
    "shift_down": {
        "train": ["shift the image down", "move everything down", "slide the picture down",
                  "move the scene downwards", "pan down", "push the content down"],
        "heldout": ["the image should move down", "down shift of the picture", "content downwards"],
        "dev": ["the picture should move down", "down shift of the scene", "everything downwards"],
    },
}
_FRAMES = {
    "train": ["{}", "please {}", "can you {}", "{} in this photo"],
    "heldout": ["could you kindly {}", "go ahead, {}"],
    "dev": ["kindly go ahead, {}", "could you {}"],
}


def _sentences(task: str, kind: str) -> list[str]:
    return [f.format(c) for c, f in itertools.product(_CORES[task][kind], _FRAMES[kind])]


PHRASINGS: dict[str, dict[str, list[str]]] = {t: {k: _sentences(t, k) for k in ("train", "heldout", "dev")}
                                             for t in TASKS}
assert set(_CORES) == set(TASKS)


@dataclass
class EditExample:
    source: Image.Image
    target: Image.Image
    instruction: str
    task: str
    # A composed task's edits, one sentence per part in order (the instruction chained as separate
    # edits: data.chain_edits, trainer/edits.py); () for a single task.
    edits: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ exact image operations

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


def shift_pixels(a: np.ndarray) -> int:
    """The shift tasks move content by one SD latent cell (8 px; a quarter of smaller images)."""
    return max(1, min(8, a.shape[1] // 4))


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Content moves by (dy, dx) pixels; the uncovered border repeats the edge row/column."""
    h, w = a.shape[:2]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return a[rows][:, cols]


def _add(a, delta) -> np.ndarray:
    return _to_u8(a.astype(np.float64) + np.asarray(delta, dtype=np.float64))


def _luma(a) -> np.ndarray:
    f = a.astype(np.float64)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


_OPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "brighten": lambda a: _add(a, BRIGHTNESS_DELTA),
    "darken": lambda a: _add(a, -BRIGHTNESS_DELTA),
    "warm": lambda a: _add(a, (WARMTH_DELTA, 0, -WARMTH_DELTA)),
    "cool": lambda a: _add(a, (-WARMTH_DELTA, 0, WARMTH_DELTA)),
    "shift_left": lambda a: _shift(a, 0, -shift_pixels(a)),
    "shift_right": lambda a: _shift(a, 0, shift_pixels(a)),
    "shift_up": lambda a: _shift(a, -shift_pixels(a), 0),
    "shift_down": lambda a: _shift(a, shift_pixels(a), 0),
    # hue rotation by a third of the colour wheel = a cyclic channel permutation (exact inverses)
    "hue_forward": lambda a: np.ascontiguousarray(a[..., [2, 0, 1]]),
    "hue_backward": lambda a: np.ascontiguousarray(a[..., [1, 2, 0]]),
    "grayscale": lambda a: np.repeat(_to_u8(_luma(a))[..., None], 3, axis=2),
    "sepia": lambda a: _to_u8(a.astype(np.float64) @ SEPIA.T),
    "invert": lambda a: 255 - a,
    "swap_red_blue": lambda a: np.ascontiguousarray(a[..., [2, 1, 0]]),
}
assert set(_OPS) == set(TASKS)


def apply_task(task: str, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """The exact target of ``task`` for ``image`` (same type out as in: PIL image or uint8 array)."""
    if task not in _OPS and task not in COMPOSED_TASKS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)} and the composed {', '.join(COMPOSED_TASKS)}")
    out = _op(task)(_to_array(image))
    return Image.fromarray(out, "RGB") if isinstance(image, Image.Image) else out


# ------------------------------------------------------------------------------ source images

def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return 255.0 * np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    return _hsv_to_rgb(rng.uniform(), rng.uniform(*sat), rng.uniform(*val))


def _soft_shape(rng, yy, xx, edge: float) -> np.ndarray:
    """Coverage in [0, 1] of one random disc, ellipse or rounded square with a soft edge."""
    kind = rng.integers(3)
    cy, cx = rng.uniform(-0.55, 0.55, size=2)
    r = rng.uniform(0.3, 0.55)
    ang = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u, v = np.cos(ang) * dx + np.sin(ang) * dy, -np.sin(ang) * dx + np.cos(ang) * dy
    if kind == 0:                    # disc
        d = np.hypot(u, v) - r
    elif kind == 1:                  # ellipse (approximate signed distance)
        e = rng.uniform(0.5, 0.8)
        d = (np.hypot(u, v / e) - r) * e
    else:                            # rounded square
        q = np.maximum(np.abs(np.stack([u, v])) - 0.7 * r, 0.0)
        d = np.hypot(q[0], q[1]) - 0.3 * r
    return 1.0 / (1.0 + np.exp(d / edge))


def make_source(rng: np.random.Generator, resolution: int = 32) -> np.ndarray:
    """One random smooth scene as an HxWx3 uint8 array: a two-colour gradient and 1-3 soft shapes."""
    res = int(resolution)
    coords = (np.arange(res, dtype=np.float64) + 0.5) / res * 2.0 - 1.0  # pixel centres in -1..1
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    c0, c1 = _colour(rng, (0.2, 0.6), (0.3, 0.7)), _colour(rng, (0.2, 0.6), (0.3, 0.7))
    ang = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(ang) * xx + np.sin(ang) * yy + 1.0) / 2.0, 0, 1)[..., None]
    img = c0 + (c1 - c0) * t
    edge = 0.09  # edge softness in half-widths: about 1.4 px at 32 px, smooth at the latent scale
    for _ in range(int(rng.integers(1, 4))):
        cover = _soft_shape(rng, yy, xx, edge)[..., None]
        img = img * (1 - cover) + _colour(rng, (0.55, 0.9), (0.45, 0.85)) * cover
    return _to_u8(img)


# ------------------------------------------------------------------------------ examples / splits

_STREAM = {"train": 0, "val": 1, "heldout_phrasing": 1, "dev_phrasing": 1}   # both reuse val images
_PHRASE_KIND = {"train": "train", "val": "train", "heldout_phrasing": "heldout", "dev_phrasing": "dev"}


def instruction_for(task: str, kind: str, rng: np.random.Generator) -> str:
    """A random sentence for ``task`` from its ``"train"``, ``"heldout"`` or ``"dev"`` sentences."""
    options = (PHRASINGS[task] if task in PHRASINGS else COMPOSED_PHRASINGS[task])[kind]
    return options[int(rng.integers(len(options)))]


def _example_rngs(split: str, seed: int, i: int) -> tuple[np.random.Generator, np.random.Generator]:
    image_rng = np.random.default_rng([int(seed), _STREAM[split], int(i), 0])
    phrase_rng = np.random.default_rng([int(seed), _STREAM[split], int(i), 1 + SPLITS.index(split)])
    return image_rng, phrase_rng


def make_examples(split: str, n: int, seed: int = 0, resolution: int = 32,
                  tasks: Sequence[str] | None = None, start: int = 0) -> list[EditExample]:
    """``n`` deterministic examples of ``split`` ("train", "val", "heldout_phrasing" or "dev_phrasing").

    Example i (counting from ``start``) has task ``tasks[i % len(tasks)]`` (all :data:`TASKS`
    by default), a source image drawn from the split's own image stream (train and val never
    share one; heldout_phrasing and dev_phrasing have val's images) and a sentence drawn from the
    split's wordings. Composed tasks have no dev wording.
    The same (split, seed, resolution, tasks, i) always gives the same example, so
    ``make_examples(s, 10)[5:]`` equals ``make_examples(s, 5, start=5)``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    task_list = tuple(TASKS if tasks is None else tasks)
    unknown = [t for t in task_list if t not in _OPS and t not in COMPOSED_TASKS]
    if unknown or not task_list:
        raise ValueError(f"unknown or empty task list: {unknown or task_list}")
    kind = _PHRASE_KIND[split]
    no_wording = [t for t in task_list if kind not in (PHRASINGS[t] if t in PHRASINGS else COMPOSED_PHRASINGS[t])]
    if no_wording:
        raise ValueError(f"split {split!r} has no {kind!r} sentences for {', '.join(no_wording)}")
    out = []
    for i in range(int(start), int(start) + int(n)):
        image_rng, phrase_rng = _example_rngs(split, seed, i)
        task = task_list[i % len(task_list)]
        src = make_source(image_rng, resolution)
        out.append(EditExample(
            source=Image.fromarray(src, "RGB"),
            target=Image.fromarray(_op(task)(src), "RGB"),
            instruction=instruction_for(task, kind, phrase_rng),
            task=task,
            edits=_edits(task, kind, np.random.default_rng([int(seed), _STREAM[split], int(i), 50 + SPLITS.index(split)])),
        ))
    return out


# ------------------------------------------------------------------------------ composed edits

# Two edits in one instruction ("make it brighter and shift the image left"): the exact target
# applies the first edit, then the second. Combinations join two of the four conflicting pairs'
# kinds (brightness, temperature, position, hue), never a task with its own partner (they cancel).
# Per pair of kinds one of the four combinations is held out; every held-out combination's two
# tasks are each trained in other combinations, never together (tests/test_synthetic.py checks).
# None of this is in TASKS or PHRASINGS: the demo's base, data and text encoder are unchanged.

def compose(a: str, b: str) -> str:
    return f"{a}+{b}"


def parts(task: str) -> tuple[str, ...]:
    """The single tasks of a task name: ("brighten", "shift_left") for "brighten+shift_left"."""
    return tuple(task.split("+"))


def _combinations() -> tuple[list[str], list[str]]:
    train, heldout = [], []
    for i, j in itertools.combinations(range(len(CONFLICT_PAIRS)), 2):
        for k, l in itertools.product(range(2), repeat=2):
            name = compose(CONFLICT_PAIRS[i][k], CONFLICT_PAIRS[j][l])
            (heldout if k == l == (i + j) % 2 else train).append(name)
    return train, heldout


_TRAIN_COMBOS, _HELDOUT_COMBOS = _combinations()
COMPOSED_TRAIN: tuple[str, ...] = tuple(_TRAIN_COMBOS)
COMPOSED_HELDOUT: tuple[str, ...] = tuple(_HELDOUT_COMBOS)
COMPOSED_TASKS: tuple[str, ...] = COMPOSED_TRAIN + COMPOSED_HELDOUT
_JOINERS = {"train": ["{} and {}", "{}, then {}"], "heldout": ["{} and also {}"]}


def _composed_sentences(task: str, kind: str) -> list[str]:
    a, b = parts(task)
    cores = [j.format(x, y) for j in _JOINERS[kind] for x in _CORES[a][kind] for y in _CORES[b][kind]]
    return [f.format(c) for c, f in itertools.product(cores, _FRAMES[kind])]


COMPOSED_PHRASINGS: dict[str, dict[str, list[str]]] = {
    t: {k: _composed_sentences(t, k) for k in ("train", "heldout")} for t in COMPOSED_TASKS}


def _edits(task: str, kind: str, rng: np.random.Generator) -> tuple[str, ...]:
    """A composed task's parts as separate sentences of the same wording kind (their own random
    stream: the examples' other draws are unchanged)."""
    return tuple(instruction_for(p, kind, rng) for p in parts(task)) if task in COMPOSED_TASKS else ()


def _op(task: str) -> Callable[[np.ndarray], np.ndarray]:
    if task in _OPS:
        return _OPS[task]
    first, second = (_OPS[p] for p in parts(task))
    return lambda a: second(first(a))
