"""``data.replay``: mix old data into a run in a set share (extending a generator without forgetting).

    data:
      replay:
        fraction: 0.1          # share of every epoch's rows that come from the sources below
        distill: 1.0           # optional, with --init-from a generator: keep its LoRAs for these rows
        distill_rows: 16       # optional: that many rows of the sources per batch for the distillation alone
        sources:
          - {source: synthetic, tasks: [brighten, darken], n_train: 600}
          - {source: manifest, path: old/edits.jsonl}
          - {source: parquet, path: old/parquet_folder}

The training set becomes the new rows plus ``round(n * fraction / (1 - fraction))`` replay rows
(n = new rows), taken in turn from the sources (each source's rows in a fixed seeded order,
repeated when it has fewer). Every epoch is one permutation of that set, so the share holds
exactly per epoch, and resume, data-parallel slicing and the encoded-rows cache work unchanged.
Validation rows stay the new data's. The replay rows are the last ``replay_rows`` of the mixed set
(``is_replay``), which is how ``distill`` (trainer/distill.py) finds them in a batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SOURCE_KEYS = {"source", "path", "control_path", "tasks", "n_train"}


@dataclass
class ReplayConfig:
    fraction: float = 0.0  # share of the training rows from the replay sources (0 = off)
    sources: list | None = None  # [{source: synthetic|manifest|parquet, path, tasks, n_train}]
    distill: float = 0.0  # > 0: keep the LoRAs written for replay rows the --init-from generator's (trainer/distill.py)
    distill_rows: int = 0  # with distill: rows of the sources per batch that only the generator sees, for that term alone


def replay_problems(r: ReplayConfig) -> list[str]:
    """What is wrong with a replay section (for trainer.config.validate)."""
    out = []
    if not 0 <= r.fraction < 1:
        out.append(f"data.replay.fraction must be in [0, 1), got {r.fraction}")
    if r.fraction > 0 and not r.sources:
        out.append("data.replay.fraction > 0 needs data.replay.sources (the old data: a list of "
                   "{source: synthetic|manifest|parquet, path: ..., tasks: [...], n_train: N})")
    if r.distill < 0:
        out.append(f"data.replay.distill must be >= 0 (the weight of the distillation loss), got {r.distill}")
    elif r.distill > 0 and r.fraction <= 0:
        out.append("data.replay.distill acts on the replay rows: it needs data.replay.fraction > 0 and sources")
    if not isinstance(r.distill_rows, int) or isinstance(r.distill_rows, bool) or r.distill_rows < 0:
        out.append(f"data.replay.distill_rows must be a whole number >= 0 (replay rows per batch for the distillation), "
                   f"got {r.distill_rows!r}")
    elif r.distill_rows > 0 and r.distill <= 0:
        out.append("data.replay.distill_rows adds rows to the distillation term: it needs data.replay.distill > 0")
    for i, s in enumerate(r.sources or []):
        if not isinstance(s, dict):
            out.append(f"data.replay.sources[{i}] must be a mapping like {{source: manifest, path: old.jsonl}}, got {s!r}")
            continue
        unknown = set(s) - SOURCE_KEYS
        if unknown:
            out.append(f"data.replay.sources[{i}] has unknown key(s) {sorted(unknown)}; known: {sorted(SOURCE_KEYS)}")
        kind = s.get("source", "synthetic")
        from .config import SOURCES  # config imports this module

        if kind not in SOURCES:
            out.append(f"data.replay.sources[{i}].source '{kind}' is not one of {', '.join(SOURCES)}")
        elif kind != "synthetic" and not s.get("path"):
            out.append(f"data.replay.sources[{i}] (source {kind}) needs a path")
    return out


def active(cfg) -> bool:
    r = getattr(cfg.data, "replay", None)
    return bool(r and r.fraction > 0 and r.sources)


def replay_rows_wanted(n_new: int, fraction: float) -> int:
    return int(round(n_new * fraction / (1 - fraction)))


def _source_dataset(s: dict, cfg):
    from .data import read_source, synthetic_dataset

    kind = s.get("source", "synthetic")
    if kind == "synthetic":
        return synthetic_dataset("train", int(s.get("n_train") or cfg.data.n_train or 64), cfg.train.seed, cfg.base.resolution,
                                 s.get("tasks"))
    return read_source(kind, s["path"], s.get("control_path", ""), cfg.data.caption_ext)


def mix(train, cfg):
    """``train`` (an EditDataset of the new data) with the replay rows appended."""
    from .data import EditDataset

    if not active(cfg):
        return train
    r = cfg.data.replay
    want = replay_rows_wanted(len(train), r.fraction)
    sets = [_source_dataset(s, cfg) for s in r.sources]
    orders = [np.random.default_rng([cfg.train.seed, 7919, i]).permutation(len(d)) for i, d in enumerate(sets)]
    rows = list(train.rows)
    for j in range(want):  # round-robin over the sources, each in its own fixed order
        i = j % len(sets)
        d, order = sets[i], orders[i]
        k = j // len(sets)
        rows.append(_absolute(d.rows[int(order[k % len(order)])], d.root))
    mixed = EditDataset(rows, train.root, scale=train.scale)
    mixed.replay_rows = want  # counted in the summary
    return mixed


def old_rows(cfg):
    """Every row of the replay sources, as one EditDataset: where ``distill_rows`` draws from (the
    distillation needs no targets the base learns from, so it can hold all old requests, not
    only the replay share)."""
    from .data import EditDataset

    sets = [_source_dataset(s, cfg) for s in cfg.data.replay.sources]
    from .data import bucket_scale

    return EditDataset([_absolute(r, d.root) for d in sets for r in d.rows], scale=bucket_scale(cfg))


def is_replay(train, rows: torch.Tensor) -> torch.Tensor:
    """Which of these dataset row indices are replay rows (bool, same shape)."""
    return rows >= len(train) - getattr(train, "replay_rows", 0)


def _absolute(row: dict, root: Path | None) -> dict:
    """Relative image paths of another manifest resolve against that manifest's folder."""
    if root is None:
        return row
    out = dict(row)
    for k, v in row.items():
        if isinstance(v, str) and k not in ("instruction", "edit_prompt", "edit_instruction", "prompt", "text", "task",
                                            "task_type", "edit_type", "category") and not Path(v).is_absolute():
            if (Path(root) / v).is_file():
                out[k] = str(Path(root) / v)
        elif isinstance(v, dict) and v.get("path") and not v.get("bytes") and not Path(v["path"]).is_absolute():
            out[k] = {**v, "path": str(Path(root) / v["path"])}
    return out


def key(cfg) -> dict | None:
    """What names the replay rows in the encoded-rows cache key (None when replay is off)."""
    if not active(cfg):
        return None
    files = []
    for s in cfg.data.replay.sources:
        p = Path(s.get("path") or "")
        if s.get("path") and p.exists():
            for f in ([p] if p.is_file() else sorted(p.rglob("*.parquet"))):
                st = f.stat()
                files.append([str(f), st.st_size, st.st_mtime_ns])
    return {"replay": dataclasses.asdict(cfg.data.replay), "files": files}
