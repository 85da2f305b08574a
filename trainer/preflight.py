"""Data pre-flight: scan every row before any model loads and say what the data is.

    python -m trainer.train --config my.yaml --check-data     # the report only (exit 0, or 2: no usable rows)

The trainer runs the same scan at the start of every run (the report goes to the log) and then
trains on the usable rows only. It reports:
  * unusable rows, counted by reason, with the first few row numbers and their image paths;
  * the column names found against the ones accepted (and which one was used for each role);
  * image sizes and aspect ratios (a histogram), images smaller than base.resolution;
  * the instruction length in the base's own tokenizer against the text encoder's limit;
  * duplicate rows and rows whose source equals their target (nothing to learn).
A dataset without a usable row is a :class:`DataError` (a clear message naming the accepted
columns, exit code 2), not a traceback after the models have loaded.
"""
from __future__ import annotations

import hashlib
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import (SOURCE_KEYS, SYNTHETIC_N_TRAIN, TARGET_KEYS, TASK_KEYS, TEXT_KEYS, BadRow, EditDataset, _pick,
                   bucket_scale, read_source, source_kind, synthetic_dataset, val_split)

SHOW_ROWS = 5  # row numbers listed per reason
# (tokenizer folder, default text length) of each family's text condition (trainer/families)
TEXT_ENCODERS = {"sd15_ip2p": ("tokenizer", 77), "flux_kontext": ("tokenizer_2", 256),
                 "qwen_image_edit": ("tokenizer", 1024), "qwen_image_edit_plus": ("tokenizer", 1024),
                 "flux2_klein": ("tokenizer", 512)}
ROLES = (("source", SOURCE_KEYS), ("target", TARGET_KEYS), ("instruction", TEXT_KEYS), ("task", TASK_KEYS))


class DataError(ValueError):
    """The data cannot train anything; the message says what was found and what is accepted."""


def accepted_columns() -> str:
    return "; ".join(f"{role}: {', '.join(keys)}" for role, keys in ROLES) + " (task is optional)"


@dataclass
class DataReport:
    label: str  # "training data" / "validation data"
    where: str
    rows: int = 0
    usable: list[int] = field(default_factory=list)
    bad: dict = field(default_factory=lambda: defaultdict(list))  # reason -> [(row index, location, paths)]
    columns: Counter = field(default_factory=Counter)
    used: dict = field(default_factory=dict)  # role -> column name
    sizes: Counter = field(default_factory=Counter)  # (w, h) of the sources
    aspects: Counter = field(default_factory=Counter)
    buckets: Counter = field(default_factory=Counter)  # (w, h) the base sees (base.buckets template); empty: square crops
    small: list = field(default_factory=list)  # locations of images below the training resolution
    tokens: list = field(default_factory=list)  # instruction lengths
    token_unit: str = "tokens"
    limit: int | None = None
    over: list = field(default_factory=list)  # locations of instructions longer than the limit
    duplicates: list = field(default_factory=list)  # (location, location of the first copy)
    identical: list = field(default_factory=list)  # locations whose source equals the target
    seconds: float = 0.0

    def counts(self) -> dict:
        return {reason: len(v) for reason, v in sorted(self.bad.items())}

    def summary(self) -> dict:
        return {"where": self.where, "rows": self.rows, "usable": len(self.usable), "bad": self.counts(),
                "columns": sorted(self.columns), "used": self.used, "duplicates": len(self.duplicates),
                "source_equals_target": len(self.identical), "instructions_over_limit": len(self.over),
                "text_limit": self.limit, "seconds": round(self.seconds, 2),
                **({"buckets": {f"{w}x{h}": n for (w, h), n in self.buckets.most_common()}} if self.buckets else {})}

    def lines(self, resolution: int) -> list[str]:
        out = [f"{self.label}: {self.where}: {self.rows} rows, {len(self.usable)} usable ({self.seconds:.1f} s)"]
        if self.columns:
            roles = ", ".join(f"{r} <- '{c}'" for r, c in self.used.items()) or "none"
            out.append(f"  columns found: {', '.join(sorted(self.columns))}")
            out.append(f"  used: {roles}")
            missing = [r for r, _ in ROLES[:3] if r not in self.used]
            if missing:
                out.append(f"  no column for {', '.join(missing)}; accepted names: {accepted_columns()}")
        for reason, items in sorted(self.bad.items(), key=lambda kv: -len(kv[1])):
            first = "; ".join(f"{loc}" + (f" ({paths})" if paths else "") for _, loc, paths in items[:SHOW_ROWS])
            more = f"; ... {len(items) - SHOW_ROWS} more" if len(items) > SHOW_ROWS else ""
            out.append(f"  skipped {len(items)} x {reason}: {first}{more}")
        if self.sizes:
            top = ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.sizes.most_common(5))
            out.append(f"  source sizes: {top}" + (f", {len(self.sizes) - 5} more sizes" if len(self.sizes) > 5 else ""))
            if self.buckets:
                top = ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.buckets.most_common(8))
                more = f", {len(self.buckets) - 8} more" if len(self.buckets) > 8 else ""
                out.append(f"  buckets (the template's size of each source; a batch is one bucket): {len(self.buckets)}: {top}{more}")
                out.append("  aspect ratio (w/h) histogram:")
            else:
                out.append(f"  aspect ratio (w/h) histogram; training crops the centre square at {resolution}x{resolution}:")
            peak = max(self.aspects.values())
            for a, n in sorted(self.aspects.items()):
                out.append(f"    {a:5.2f} {'#' * max(1, round(30 * n / peak))} {n}")
        if self.small:
            size = "its bucket" if self.buckets else f"{resolution} px"
            out.append(f"  warning: {len(self.small)} row(s) have an image smaller than {size} (upscaled), "
                       f"e.g. {', '.join(self.small[:SHOW_ROWS])}")
        if self.tokens:
            limit = f" of the text encoder's limit {self.limit}" if self.limit else ""
            out.append(f"  instruction length ({self.token_unit}): median {statistics.median(self.tokens):.0f}, "
                       f"max {max(self.tokens)}{limit}")
            if self.over:
                out.append(f"  warning: {len(self.over)} instruction(s) are longer than {self.limit} {self.token_unit} and are "
                           f"cut there, e.g. {', '.join(self.over[:SHOW_ROWS])}")
        if self.duplicates:
            ex = ", ".join(f"{a} = {b}" for a, b in self.duplicates[:SHOW_ROWS])
            out.append(f"  warning: {len(self.duplicates)} duplicate row(s) (same source, target and instruction): {ex}")
        if self.identical:
            out.append(f"  warning: {len(self.identical)} row(s) have a source identical to the target (nothing to learn): "
                       f"{', '.join(self.identical[:SHOW_ROWS])}")
        return out


def _tokenizer(cfg):
    """(count function, unit, limit) for instructions: the base's own tokenizer when it is there."""
    folder, default = TEXT_ENCODERS.get(cfg.base.family, ("tokenizer", None))
    limit = cfg.base.text_tokens or default
    path = Path(cfg.base.path or "") / folder
    if path.is_dir() and not cfg.base.synthetic_full:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path))
            if cfg.base.family == "sd15_ip2p":
                limit = cfg.base.text_tokens or min(limit, tok.model_max_length)
            return (lambda text: len(tok(text, verbose=False).input_ids)), "tokens", limit
        except Exception:  # an unreadable tokenizer: the base check reports the folder
            pass
    return (lambda text: len(text.split())), "words; the base's tokenizer was not readable", limit


def _paths(row: dict) -> str:
    found = [v for v in (_pick(row, SOURCE_KEYS), _pick(row, TARGET_KEYS)) if isinstance(v, str)]
    return ", ".join(found)


def _digest(img) -> str:
    a = np.asarray(img)
    return hashlib.sha1(a.tobytes() + str(a.shape).encode()).hexdigest()


def scan(ds: EditDataset, label: str, where: str, cfg, count_tokens=None, progress: bool = False) -> DataReport:
    rep = DataReport(label, where, rows=len(ds))
    t0 = time.perf_counter()
    if count_tokens is not None:
        count, rep.token_unit, rep.limit = count_tokens
    for r in ds.rows:
        rep.columns.update(k for k in r if not k.startswith("_"))
    for role, keys in ROLES:
        hit = next((k for k in keys if k in rep.columns), None)
        if hit:
            rep.used[role] = hit
    seen: dict[str, str] = {}
    res = cfg.base.resolution
    ds.scale = bucket_scale(cfg)
    bar = None
    if progress and len(ds) > 500:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ds), desc=f"checking {label}", file=sys.stderr, disable=None)  # off on a non-terminal
    for i in range(len(ds)):
        loc = ds.locations[i]
        try:
            src, tgt, text, _ = ds.images(i)
        except BadRow as e:
            rep.bad[str(e)].append((i, loc, _paths(ds.rows[i])))
            continue
        finally:
            if bar is not None:
                bar.update(1)
        rep.usable.append(i)
        w, h = src.size
        rep.sizes[(w, h)] += 1
        rep.aspects[round(w / h * 4) / 4] += 1  # quarter steps: 1.0 square, 1.25, 1.5 (3:2), 1.75 (16:9)...
        bw, bh = (res, res) if ds.scale is None else ds.scale.size(w, h)
        if ds.scale is not None:
            rep.buckets[(bw, bh)] += 1
        if min(w, *tgt.size[:1]) < bw or min(h, tgt.size[1]) < bh:
            rep.small.append(loc)
        s, t = _digest(src), _digest(tgt)
        if s == t:
            rep.identical.append(loc)
        key = hashlib.sha1(f"{s}|{t}|{text}".encode()).hexdigest()
        if key in seen:
            rep.duplicates.append((loc, seen[key]))
        else:
            seen[key] = loc
        if count_tokens is not None:
            n = count(text)
            rep.tokens.append(n)
            if rep.limit and n > rep.limit:
                rep.over.append(loc)
    if bar is not None:
        bar.close()
    rep.seconds = time.perf_counter() - t0
    return rep


@dataclass
class DataCheck:
    train: DataReport
    val: DataReport | None
    notes: list[str]

    def lines(self, resolution: int) -> list[str]:
        out = ["data check:"] + self.train.lines(resolution)
        if self.val is not None:
            out += self.val.lines(resolution)
        return out + [f"  {n}" for n in self.notes]

    def summary(self) -> dict:
        return {"train": self.train.summary(), "val": self.val.summary() if self.val else None, "notes": self.notes}


def check_data(cfg, progress: bool = False, synthetic: bool = False) -> DataCheck:
    """Scan the configured data; raises :class:`DataError` when no row can train. The synthetic
    world is generated by trainer.synthetic (nothing to find) and only scanned with ``synthetic``."""
    d = cfg.data
    if d.source == "synthetic":
        n = d.n_train or SYNTHETIC_N_TRAIN
        where = f"synthetic world, data.n_train={n}"
        if synthetic:
            ds = synthetic_dataset("train", n, cfg.train.seed, cfg.base.resolution, d.tasks)
            train = scan(ds, "training data", where, cfg, _tokenizer(cfg), progress)
        else:
            train = DataReport("training data", where, rows=n, usable=list(range(n)))
        return DataCheck(train, None, [f"validation: {d.n_val} examples of the synthetic world's held-out split"])
    count = _tokenizer(cfg)
    ds = read_source(d.source, d.path, d.control_path, d.caption_ext)
    train = scan(ds, "training data", str(d.path), cfg, count, progress)
    if not train.usable:
        raise DataError(_no_rows(train))
    val, notes = None, []
    n_good = len(train.usable)
    if d.val_path:
        vds = read_source(source_kind(d.val_path), d.val_path, caption_ext=d.caption_ext)
        val = scan(vds, "validation data", str(d.val_path), cfg, count, progress)
        n_val, n_tr = len(val.usable), n_good
        notes.append(f"validation: {n_val} usable rows of data.val_path")
    else:
        n_val = len(val_split(n_good, d.val_fraction))
        n_tr = n_good - n_val
        notes.append(f"validation: {n_val} of the {n_good} usable rows held out (data.val_fraction={d.val_fraction:g})"
                     if n_val else "validation: none (data.val_fraction=0 or too few rows); the samples show training rows")
    if d.n_train is not None and d.n_train < n_tr:
        notes.append(f"training on the first {d.n_train} of {n_tr} rows (data.n_train={d.n_train})")
        n_tr = d.n_train
    else:
        notes.append(f"training on {n_tr} rows")
    if n_tr < 1:
        raise DataError(f"{d.path}: {n_good} usable row(s), all of them held out for validation; lower data.val_fraction")
    return DataCheck(train, val, notes)


def _no_rows(rep: DataReport) -> str:
    why = "; ".join(f"{n} x {r}" for r, n in rep.counts().items()) or "the data has no rows"
    lines = [f"no usable rows in {rep.where} ({rep.rows} rows: {why})."]
    if rep.columns:
        lines.append(f"columns found: {', '.join(sorted(rep.columns))}")
    lines.append(f"accepted column names: {accepted_columns()}")
    first = next(iter(rep.bad.values()), [])[:SHOW_ROWS]
    if first:
        lines.append("first rows: " + "; ".join(f"{loc}" + (f" ({p})" if p else "") for _, loc, p in first))
    return "\n".join(lines)


def print_check(check: DataCheck, resolution: int, file=None) -> None:
    print("\n".join(check.lines(resolution)), file=file or sys.stdout, flush=True)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
