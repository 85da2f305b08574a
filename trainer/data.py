"""Edit triplets (source image, instruction, target image, optional task label).

Sources:
  * ``manifest``: a JSONL or CSV file, one row per example, with image paths relative to the
    manifest (columns ``source``/``target``/``instruction``/``task``, common aliases accepted);
  * ``parquet``: a folder of ``.parquet`` files in the Hugging Face edit-dataset layout (image
    columns hold ``{"bytes": ..., "path": ...}`` structs or raw bytes), e.g. InstructPix2Pix's
    ``original_image``/``edited_image``/``edit_prompt`` or MagicBrush's ``source_img``/``target_img``/``instruction``;
  * ``folders``: target images with same-name ``.txt`` instructions and a folder of source
    (control) images with the same names, as ai-toolkit and musubi-tuner lay edit data out;
  * ``synthetic``: :mod:`trainer.synthetic`'s edit world (exact targets, conflicting tasks).

Images: with ``base.buckets: square`` both images of a row are cropped to the square of
``base.resolution``; with ``template`` the source is sized by the family template's scale node and the
target brought to its size (trainer/buckets.py), and BatchStream draws each global batch from one size.

A row with a missing field or an image that does not decode is skipped and counted by reason;
the pre-flight (:mod:`trainer.preflight`) finds them all before any model loads, with row numbers,
and the trainer trains on the usable rows only. A run never stops on bad data.

Splits and sizes mean the same for every source: ``data.n_train`` rows train (the first usable
rows; null = all of a manifest/parquet/folders, 64 synthetic examples), held out from them are
``data.val_fraction`` of the usable rows (or the rows of ``data.val_path``); the synthetic world
has its own held-out split.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hywu_nodes.core import square_resize

from .buckets import ScaleNode, fit_target, template_scale

SOURCE_KEYS = ("source", "source_image", "input_image", "original_image", "source_img", "src_img", "input")
TARGET_KEYS = ("target", "target_image", "edited_image", "output_image", "target_img", "tgt_img", "edited", "output")
TEXT_KEYS = ("instruction", "edit_prompt", "edit_instruction", "prompt", "text")
TASK_KEYS = ("task", "task_type", "edit_type", "category")
EDITS_KEY = "edits"  # optional: the instruction as separate edits chained in ComfyUI (trainer/edits.py)


class BadRow(Exception):
    """A row that cannot be used; ``str(e)`` is the reason it is counted under."""


def _pick(row: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in row and row[k] is not None and row[k] != "":
            return row[k]
    return None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL -> (3, H, W) float in [0, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def _open_image(value, root: Path | None) -> Image.Image:
    try:
        if isinstance(value, dict):
            if value.get("bytes"):
                value = value["bytes"]
            elif value.get("path"):
                value = value["path"]
            else:
                raise BadRow("empty image")
        if isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        else:
            p = Path(value)
            if root is not None and not p.is_absolute():
                p = root / p
            if not p.is_file():
                raise BadRow("image file missing")
            img = Image.open(p)
        img.load()  # decode now so a corrupt file fails here, not later
        return img.convert("RGB")
    except BadRow:
        raise
    except Exception:
        raise BadRow("corrupt image") from None


SYNTHETIC_N_TRAIN = 64  # data.n_train: null for the synthetic world
VAL_SPLIT_SEED = 20_240_601  # the held-out rows do not change with train.seed (runs of several seeds compare alike)


def parse_edits(value) -> tuple[str, ...]:
    """A row's ``edits``: a list of sentences (JSONL, parquet) or a JSON list in a CSV cell; empty
    or missing = none. Raises BadRow for anything else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRow("bad edits (not a JSON list of sentences)") from None
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise BadRow("bad edits (not a list of sentences)")
    edits = tuple(value)
    if not all(isinstance(e, str) and e.strip() for e in edits):
        raise BadRow("bad edits (an empty or non-text sentence)")
    return edits


class EditDataset:
    """Random access to raw rows; :meth:`load` decodes one row or raises :class:`BadRow`.
    ``locations[i]`` says where row ``i`` came from (file and line / row number) for messages."""

    def __init__(self, rows: list[dict], root: Path | None = None, locations: list[str] | None = None,
                 scale: ScaleNode | None = None):
        """``scale``: the family template's scale node (base.buckets template, trainer/buckets.py); None:
        every image is cropped to the square of the resolution :meth:`load` is given."""
        self.rows, self.root, self.scale = rows, root, scale
        self.locations = locations if locations is not None else [f"row {i + 1}" for i in range(len(rows))]
        self.tasks = sorted({str(t) for t in (_pick(r, TASK_KEYS) for r in rows) if t is not None})
        self._sizes: dict[int, tuple[int, int]] = {}

    def subset(self, indices) -> "EditDataset":
        indices = list(indices)
        return EditDataset([self.rows[i] for i in indices], self.root, [self.locations[i] for i in indices], self.scale)

    def bucket(self, i: int, resolution: int) -> tuple[int, int]:
        """(width, height) of row ``i``'s images as :meth:`load` gives them, from the source's size
        alone (its header; nothing decoded twice); raises BadRow."""
        if self.scale is None:
            return resolution, resolution
        if i not in self._sizes:
            row = self.rows[i]
            if "_error" in row:
                raise BadRow(row["_error"])
            src = _pick(row, SOURCE_KEYS)
            if src is None:
                raise BadRow("missing source")
            self._sizes[i] = self.scale.size(*_image_size(src, self.root))
        return self._sizes[i]

    def images(self, i: int) -> tuple[Image.Image, Image.Image, str, str]:
        """Row ``i`` decoded at its own size: (source, target, instruction, task); raises BadRow."""
        row = self.rows[i]
        if "_error" in row:
            raise BadRow(row["_error"])
        src, tgt, text = _pick(row, SOURCE_KEYS), _pick(row, TARGET_KEYS), _pick(row, TEXT_KEYS)
        missing = [n for n, v in (("source", src), ("target", tgt), ("instruction", text)) if v is None]
        if missing:
            raise BadRow("missing " + "/".join(missing))
        task = _pick(row, TASK_KEYS)
        parse_edits(row.get(EDITS_KEY))  # a bad value is a bad row (the pre-flight counts it)
        return _as_image(src, self.root), _as_image(tgt, self.root), str(text), "" if task is None else str(task)

    def edits(self, i: int) -> tuple[str, ...]:
        """Row ``i``'s separate edits (() when it has none); raises BadRow for a bad value."""
        return parse_edits(self.rows[i].get(EDITS_KEY))

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int, resolution: int) -> dict:
        source, target, text, task = self.images(i)
        src, tgt = pil_to_tensor(source)[None], pil_to_tensor(target)[None]
        if self.scale is None:  # both images in one square bucket (shorter side to R, centre crop), like the condition
            src, tgt = square_resize(src, resolution).clamp(0, 1), square_resize(tgt, resolution).clamp(0, 1)
        else:  # the source as the template's scale node sizes it, the target at that size
            src = self.scale(src)
            tgt = fit_target(tgt, src.shape[-1], src.shape[-2], self.scale)
        return {
            "source": src[0],
            "target": tgt[0],
            "instruction": text,
            "task": task,
            "edits": self.edits(i),
        }


def _as_image(value, root):
    return value if isinstance(value, Image.Image) else _open_image(value, root)


def _image_size(value, root) -> tuple[int, int]:
    """(width, height) of an image value, from its header; raises the BadRow a load would."""
    if isinstance(value, Image.Image):
        return value.size
    try:
        v = (value.get("bytes") or value.get("path")) if isinstance(value, dict) else value
        f = io.BytesIO(v) if isinstance(v, (bytes, bytearray)) else Path(v)
        if isinstance(f, Path) and root is not None and not f.is_absolute():
            f = root / f
        with Image.open(f) as img:
            return img.size
    except Exception:
        return _open_image(value, root).size  # raises what loading the row raises (missing, corrupt)


def read_manifest(path: str | os.PathLike) -> EditDataset:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data manifest not found: {path} (a .jsonl or .csv with source, target, instruction[, task] columns)")
    rows: list[dict] = []
    where: list[str] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            for r in reader:
                rows.append(dict(r))
                where.append(f"{path.name} line {reader.line_num}")
    else:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    r = {"_error": "malformed JSONL line"}
                rows.append(r if isinstance(r, dict) else {"_error": "malformed JSONL line"})
                where.append(f"{path.name} line {n}")
    return EditDataset(rows, root=path.parent, locations=where)


def read_parquet_folder(folder: str | os.PathLike) -> EditDataset:
    import pyarrow.parquet as pq

    folder = Path(folder)
    files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no .parquet files under {folder} (expected the Hugging Face edit-dataset layout: image columns + an instruction column)")
    rows: list[dict] = []
    where: list[str] = []
    for f in files:
        part = pq.read_table(f, memory_map=True).to_pylist()
        rows.extend(part)
        where.extend(f"{f.relative_to(folder)} row {k}" for k in range(len(part)))
    return EditDataset(rows, root=folder, locations=where)


def synthetic_dataset(split: str, n: int, seed: int, resolution: int, tasks=None) -> EditDataset:
    from trainer import synthetic

    kwargs = {"tasks": tasks} if tasks else {}
    examples = synthetic.make_examples(split, n, seed=seed, resolution=resolution, **kwargs)
    rows = [{"source": e.source, "target": e.target, "instruction": e.instruction, "task": e.task,
             **({EDITS_KEY: list(e.edits)} if e.edits else {})} for e in examples]
    return EditDataset(rows)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def folder_pair(path, control_path: str = "") -> tuple[Path, Path | None]:
    """(targets, controls) of a `folders` dataset: ``path`` holding ``target/`` and ``control/``, or
    ``path`` the targets and ``control_path`` the sources (ai-toolkit's folder_path / control_path)."""
    p = Path(path)
    if not control_path and (p / "target").is_dir():
        return p / "target", p / "control"
    return p, (Path(control_path) if control_path else None)


def read_folders(path, control_path: str = "", caption_ext: str = "txt") -> EditDataset:
    """A folder of target images, each with a same-name caption file (the instruction), and a folder
    of source (control) images with the same names, as ai-toolkit and musubi-tuner lay edit data out.
    A target without its caption or its source is a bad row (counted and named, not trained)."""
    targets, controls = folder_pair(path, control_path)
    if controls is None:
        raise FileNotFoundError(f"data.source folders: {targets} has no target/ and control/ subfolders, and "
                                "data.control_path is empty: give the folder of source images there")
    for what, d in (("target", targets), ("control (source)", controls)):
        if not d.is_dir():
            raise FileNotFoundError(f"data.source folders: the {what} folder {d} does not exist")
    by_stem: dict[str, list[Path]] = {}
    for f in sorted(controls.iterdir()):
        if f.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(f.stem, []).append(f)
    rows: list[dict] = []
    where: list[str] = []
    for target in sorted(f for f in targets.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
        where.append(f"{targets.name}/{target.name}")
        caption = target.with_suffix("." + caption_ext.lstrip("."))
        sources = by_stem.get(target.stem, [])
        source = next((c for c in sources if c.name == target.name), sources[0] if sources else None)
        text = caption.read_text(errors="replace").strip() if caption.is_file() else None
        if text is None:
            rows.append({"_error": f"no instruction file (.{caption_ext.lstrip('.')}) beside the target image"})
        elif not text:
            rows.append({"_error": "empty instruction file"})
        elif source is None:
            rows.append({"_error": "no source image of the same name in the control folder"})
        else:
            rows.append({"source": str(source), "target": str(target), "instruction": text, **_sidecar(target)})
    matched = {t.stem for t in targets.iterdir() if t.suffix.lower() in IMAGE_SUFFIXES}
    for stem in sorted(set(by_stem) - matched):  # reported, as the other sources report unusable rows
        for f in by_stem[stem]:
            rows.append({"_error": "source image without a target of the same name"})
            where.append(f"{controls.name}/{f.name}")
    if not rows:
        raise FileNotFoundError(f"data.source folders: no images ({', '.join(IMAGE_SUFFIXES)}) in {targets}")
    return EditDataset(rows, locations=where)


def _sidecar(target: Path) -> dict:
    """The optional ``<stem>.json`` beside a target: its ``task`` label and ``edits`` list (chained
    edits, as in a manifest row). A file that is not a JSON object is a bad row."""
    f = target.with_suffix(".json")
    if not f.is_file():
        return {}
    try:
        extra = json.loads(f.read_text())
    except (OSError, ValueError):
        extra = None
    if not isinstance(extra, dict):
        return {"_error": f"sidecar {f.suffix} is not a JSON object"}
    return {k: extra[k] for k in ("task", EDITS_KEY) if k in extra}


def source_kind(path) -> str:
    """The source a data.val_path (or another path given without one) is: folders, parquet or manifest."""
    p = Path(path)
    return "folders" if (p / "target").is_dir() else "parquet" if p.is_dir() else "manifest"


def read_source(source: str, path: str, control_path: str = "", caption_ext: str = "txt") -> EditDataset:
    if source == "folders":
        return read_folders(path, control_path, caption_ext)
    return read_manifest(path) if source == "manifest" else read_parquet_folder(path)


def bucket_scale(cfg) -> ScaleNode | None:
    """The scale node rows go through (base.buckets template), or None (square crops)."""
    return template_scale(cfg.base.family, cfg.base.megapixels) if cfg.base.buckets == "template" else None


def collate_groups(items: list[dict], task_index: dict | None = None, batch_size: int | None = None) -> list[dict]:
    """Items as batches of one image size each (sizes in order of first appearance, at most ``batch_size``
    rows per batch): the held-out rows and previews of a bucketed run are of several sizes."""
    groups: dict[tuple, list[dict]] = {}
    for it in items:
        groups.setdefault(tuple(it["source"].shape), []).append(it)
    step = batch_size or max(1, len(items))
    return [collate(g[k:k + step], task_index) for g in groups.values() for k in range(0, len(g), step)]


def preview_rows(cfg, task_index: dict | None = None) -> list[dict] | None:
    """train.samples as batches (one per size): the user's images, sized as training rows are, with their
    instructions (no target: the preview grid shows source | base | generated LoRA); None without."""
    from .config import sample_fields

    if not cfg.train.samples:
        return None
    rows = [{"source": image, "target": image, "instruction": text}
            for image, text in map(sample_fields, cfg.train.samples)]
    ds = EditDataset(rows, scale=bucket_scale(cfg))
    return collate_groups([ds.load(i, cfg.base.resolution) for i in range(len(ds))], task_index)


def val_split(n: int, fraction: float) -> list[int]:
    """Indices (of ``n`` usable rows) held out for validation: a fixed random choice, at least one
    row when there are two or more and ``fraction`` > 0."""
    if fraction <= 0 or n < 2:
        return []
    k = min(n - 1, max(1, int(round(n * fraction))))
    g = torch.Generator().manual_seed(VAL_SPLIT_SEED)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def build_datasets(cfg, usable: list[int] | None = None, val_usable: list[int] | None = None) -> tuple[EditDataset, EditDataset]:
    """(train, val) datasets of a :class:`trainer.config.TrainConfig`. ``usable`` / ``val_usable``:
    the rows the pre-flight found usable (trainer.preflight); the others are left out here."""
    d, r = cfg.data, cfg.base.resolution
    if d.source == "synthetic":
        train = synthetic_dataset("train", d.n_train or SYNTHETIC_N_TRAIN, cfg.train.seed, r, d.tasks)
        val = synthetic_dataset("val", d.n_val, cfg.train.seed, r, d.tasks)
        train.scale = val.scale = bucket_scale(cfg)
        return train, val
    everything = read_source(d.source, d.path, d.control_path, d.caption_ext)
    everything.scale = bucket_scale(cfg)
    good = everything.subset(usable if usable is not None else range(len(everything)))
    if d.val_path:
        val = read_source(source_kind(d.val_path), d.val_path, caption_ext=d.caption_ext)
        val.scale = everything.scale
        val = val.subset(val_usable) if val_usable is not None else val
        train = good
    else:
        held = set(val_split(len(good), d.val_fraction))
        val = good.subset(sorted(held))
        train = good.subset(i for i in range(len(good)) if i not in held)
    if d.n_train is not None:
        train = train.subset(range(min(d.n_train, len(train))))
    return train, val


class BatchStream:
    """Deterministic, resumable batches for one process of a data-parallel run.

    Each global batch takes the next ``batch_size * world`` positions of a seeded per-epoch
    permutation; process ``rank`` decodes its contiguous slice. A bad row is counted and its
    slot refilled with a valid sample of the same slice, so every process keeps the same batch
    size and position (the state is just ``epoch`` and ``cursor``).
    """

    def __init__(self, dataset: EditDataset, batch_size: int, resolution: int, seed: int, rank: int = 0, world: int = 1,
                 load=None, collate_fn=None):
        """``load(i)`` returns row ``i`` as an item (or raises :class:`BadRow`) and ``collate_fn``
        joins items into a batch; by default rows are decoded images (:meth:`EditDataset.load`)
        and :func:`collate`. The trainer passes its cache of encodings here (trainer.encoded)."""
        if len(dataset) == 0:
            raise ValueError("the training data has no rows")
        self.ds, self.b, self.res, self.seed, self.rank, self.world = dataset, batch_size, resolution, seed, rank, world
        self._load = load or (lambda i: dataset.load(i, resolution))
        self._collate = collate_fn or collate
        self.epoch, self.cursor = 0, 0
        self.skipped: Counter = Counter()
        self._bad: set[int] = set()
        self._task_index = {t: i for i, t in enumerate(dataset.tasks)}
        self._bucketed: tuple = (None, None)  # (epoch, its bucketed order)

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.ds), generator=g)
        if getattr(self.ds, "scale", None) is None:
            return order
        if self._bucketed[0] != self.epoch:
            self._bucketed = (self.epoch, self._bucket_order(order, g))
        return self._bucketed[1]

    def _bucket_order(self, order: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``order`` rearranged so that every global batch is one bucket (one image size): each
        bucket's rows in ``order``'s order, its last batch filled up with its own first rows, then
        the batches shuffled. Every row still comes once per epoch (a bucket smaller than a batch
        comes more often)."""
        n = self.b * self.world
        buckets: dict = {}
        for i in order.tolist():
            try:
                key = self.ds.bucket(i, self.res)
            except BadRow:
                key = None  # loading it raises again: counted and refilled as any bad row
            buckets.setdefault(key, []).append(i)
        batches = []
        for rows in buckets.values():
            rows = rows + [rows[k % len(rows)] for k in range(-len(rows) % n)]
            batches += [rows[k:k + n] for k in range(0, len(rows), n)]
        return torch.tensor([i for k in torch.randperm(len(batches), generator=g).tolist() for i in batches[k]])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "skipped": dict(self.skipped), "bad": sorted(self._bad)}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.cursor = int(s["epoch"]), int(s["cursor"])
        self.skipped, self._bad = Counter(s.get("skipped", {})), set(s.get("bad", []))

    def next_batch(self) -> dict:
        g = self.b * self.world
        for _ in range(1000):  # bounded: a dataset with no valid row fails instead of looping
            order = self._order()
            if self.cursor + g > len(order):  # drop the ragged tail so every global batch is full
                self.epoch, self.cursor = self.epoch + 1, 0
                if g > len(order):
                    order = order.repeat((g + len(order) - 1) // len(order))
                else:
                    continue
            lo = self.cursor + self.rank * self.b
            idx = order[lo : lo + self.b].tolist()
            self.cursor += g
            batch = self.batch_of(idx)
            if batch is not None:
                return batch
        raise RuntimeError(f"no valid rows found in the training data; skipped so far: {dict(self.skipped)}")

    def batch_of(self, idx: list[int]) -> dict | None:
        """These dataset rows as one batch of ``len(idx)`` (a bad row's slot refilled with a valid
        row of the same list), or None when none of them is valid."""
        items, rows = [], []
        for i in idx:
            if i in self._bad:
                continue
            try:
                items.append(self._load(i))
                rows.append(i)
            except BadRow as e:
                self._bad.add(i)
                self.skipped[str(e)] += 1
        if not items:
            return None
        while len(items) < len(idx):  # refill bad slots (keeps batch shapes equal across processes)
            items.append(items[len(items) % max(1, len(items))])
            rows.append(rows[len(rows) % max(1, len(rows))])
        batch = self._collate(items, self._task_index)
        batch["row"] = torch.tensor(rows, dtype=torch.long)  # dataset indices (replay rows: trainer/replay.py)
        return batch


def collate(items: list[dict], task_index: dict[str, int] | None = None) -> dict:
    task_index = task_index or {}
    return {
        "source": torch.stack([it["source"] for it in items]),
        "target": torch.stack([it["target"] for it in items]),
        "instruction": [it["instruction"] for it in items],
        "task": [it["task"] for it in items],
        "task_id": torch.tensor([task_index.get(it["task"], -1) for it in items], dtype=torch.long),
        "edits": [it.get("edits", ()) for it in items],
    }
