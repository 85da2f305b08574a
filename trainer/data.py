"""Edit triplets (source image, instruction, target image, optional task label).

Sources:
  * ``manifest``: a JSONL or CSV file, one row per example, with image paths relative to the
    manifest (columns ``source``/``target``/``instruction``/``task``, common aliases accepted);
  * ``parquet``: a folder of ``.parquet`` files in the Hugging Face edit-dataset layout (image
    columns hold ``{"bytes": ..., "path": ...}`` structs or raw bytes), e.g. InstructPix2Pix's
    ``original_image``/``edited_image``/``edit_prompt`` or MagicBrush's ``source_img``/``target_img``/``instruction``;
  * ``synthetic``: :mod:`trainer.synthetic`'s edit world (exact targets, conflicting tasks).

A row with a missing field or an image that does not decode is skipped and counted by reason
(:class:`BatchStream` reports the counts); a run never stops on bad data.
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

SOURCE_KEYS = ("source", "source_image", "input_image", "original_image", "source_img", "src_img", "input")
TARGET_KEYS = ("target", "target_image", "edited_image", "output_image", "target_img", "tgt_img", "edited", "output")
TEXT_KEYS = ("instruction", "edit_prompt", "edit_instruction", "prompt", "text")
TASK_KEYS = ("task", "task_type", "edit_type", "category")


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


class EditDataset:
    """Random access to raw rows; :meth:`load` decodes one row or raises :class:`BadRow`."""

    def __init__(self, rows: list[dict], root: Path | None = None):
        self.rows, self.root = rows, root
        self.tasks = sorted({str(t) for t in (_pick(r, TASK_KEYS) for r in rows) if t is not None})

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int, resolution: int) -> dict:
        row = self.rows[i]
        if "_error" in row:
            raise BadRow(row["_error"])
        src, tgt, text = _pick(row, SOURCE_KEYS), _pick(row, TARGET_KEYS), _pick(row, TEXT_KEYS)
        missing = [n for n, v in (("source", src), ("target", tgt), ("instruction", text)) if v is None]
        if missing:
            raise BadRow("missing " + "/".join(missing))
        task = _pick(row, TASK_KEYS)
        source = _as_image(src, self.root)
        target = _as_image(tgt, self.root)
        return {
            # Both images share one square bucket (shorter side to R, centre crop), like the condition.
            "source": square_resize(pil_to_tensor(source)[None], resolution)[0].clamp(0, 1),
            "target": square_resize(pil_to_tensor(target)[None], resolution)[0].clamp(0, 1),
            "instruction": str(text),
            "task": "" if task is None else str(task),
        }


def _as_image(value, root):
    return value if isinstance(value, Image.Image) else _open_image(value, root)


def read_manifest(path: str | os.PathLike) -> EditDataset:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data manifest not found: {path} (a .jsonl or .csv with source, target, instruction[, task] columns)")
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
    else:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    r = {"_error": "malformed JSONL line"}
                rows.append(r if isinstance(r, dict) else {"_error": "malformed JSONL line"})
    return EditDataset(rows, root=path.parent)


def read_parquet_folder(folder: str | os.PathLike) -> EditDataset:
    import pyarrow.parquet as pq

    folder = Path(folder)
    files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no .parquet files under {folder} (expected the Hugging Face edit-dataset layout: image columns + an instruction column)")
    rows: list[dict] = []
    for f in files:
        rows.extend(pq.read_table(f, memory_map=True).to_pylist())
    return EditDataset(rows, root=folder)


def synthetic_dataset(split: str, n: int, seed: int, resolution: int, tasks=None) -> EditDataset:
    from trainer import synthetic

    kwargs = {"tasks": tasks} if tasks else {}
    examples = synthetic.make_examples(split, n, seed=seed, resolution=resolution, **kwargs)
    rows = [{"source": e.source, "target": e.target, "instruction": e.instruction, "task": e.task} for e in examples]
    return EditDataset(rows)


def build_datasets(cfg) -> tuple[EditDataset, EditDataset]:
    """(train, val) datasets of a :class:`trainer.config.TrainConfig`."""
    d, r = cfg.data, cfg.base.resolution
    if d.source == "synthetic":
        train = synthetic_dataset("train", d.n_train, cfg.train.seed, r, d.tasks)
        val = synthetic_dataset("val", d.n_val, cfg.train.seed, r, d.tasks)
        return train, val
    train = read_manifest(d.path) if d.source == "manifest" else read_parquet_folder(d.path)
    val = EditDataset(train.rows[: d.n_val], train.root)  # the first rows, as a fixed visual check
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

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.ds), generator=g)

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
            items = []
            for i in idx:
                if i in self._bad:
                    continue
                try:
                    items.append(self._load(i))
                except BadRow as e:
                    self._bad.add(i)
                    self.skipped[str(e)] += 1
            if items:
                while len(items) < self.b:  # refill bad slots (keeps batch shapes equal across processes)
                    items.append(items[len(items) % max(1, len(items))])
                return self._collate(items, self._task_index)
        raise RuntimeError(f"no valid rows found in the training data; skipped so far: {dict(self.skipped)}")


def collate(items: list[dict], task_index: dict[str, int] | None = None) -> dict:
    task_index = task_index or {}
    return {
        "source": torch.stack([it["source"] for it in items]),
        "target": torch.stack([it["target"] for it in items]),
        "instruction": [it["instruction"] for it in items],
        "task": [it["task"] for it in items],
        "task_id": torch.tensor([task_index.get(it["task"], -1) for it in items], dtype=torch.long),
    }
