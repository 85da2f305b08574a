"""Pre-encoded training rows: what is frozen and deterministic per example is computed once.

The base, its VAE and its text encoder never change while a generator trains, so the latents
of a row's source and target images and the text features of its instruction (from which the
generator's condition is assembled) are the same at every visit. :class:`EncodedRows` encodes
the rows before the first step, in fixed chunks of consecutive rows, in index order: the
values do not depend on the data order, the process, or where a run resumed, so resuming and
data-parallel slicing stay exact. Noise, timesteps and CFG dropout are still drawn per step
and per global sample slot (``families.base.sample_generators``).

Memory is bounded (``data.cache_mb``): when the first chunk shows that the whole dataset would
not fit, the rows go to disk instead, with ``data.cache_dir``: encoded once in shards that each fit
the budget (:class:`StreamedRows`), then read row by row from the memory-mapped files; without
``data.cache_dir`` nothing is kept and the trainer encodes every batch as it comes (a partial cache
would delay the first step and still encode most rows). Text features are kept once per distinct
instruction, and once per distinct sentence of the rows' chained edits (trainer/edits.py), so a
chained row costs no text encoding per step either; of an edit only what the generator reads
(``adapter.generator_text_items``: for Qwen-Image-Edit one Qwen2.5-VL pass, no negative or
reference latent, which only the base reads of the row's instruction).

``data.cache_dir`` also keeps them on disk (one safetensors file + JSON metadata, named by a
key over the base's files, the data settings, resolution and dtype), so the next run on the
same base and data (another method, a resumed run) loads them instead of encoding again.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import BadRow, EditDataset


UNBOUNDED_MB = 2.0 ** 40  # a shard's rows are bounded by the shard size, not by data.cache_mb


def _nbytes(x) -> int:
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size()


class EncodedRows:
    def __init__(self, adapter, dataset: EditDataset, resolution: int, max_mb: float, chunk: int = 16):
        self.adapter, self.ds, self.res, self.chunk = adapter, dataset, resolution, max(1, chunk)
        self.max_bytes = int(max_mb * 2**20)
        # index -> (source latent, target latent, instruction, task, the generator's source latent or None)
        self.rows: dict[int, tuple] = {}
        self.texts: dict[str, object] = {}  # instruction -> text item (adapter.text_items)
        self.edit_texts: dict[str, object] = {}  # edit sentence -> generator item, where not an instruction
        self.bad: dict[int, str] = {}  # index -> reason (counted by the stream when it reaches the row)
        self.nbytes, self.seconds, self.source = 0, 0.0, None

    @torch.no_grad()
    def fill(self, cache_file: str | os.PathLike | None = None, write: bool = True) -> "EncodedRows | None":
        """Encode every row in index order, ``chunk`` at a time. ``cache_file``: read it when present,
        else write it after encoding (``write``: the main process only). A dataset that would not fit
        the memory budget is kept on disk beside ``cache_file`` (:class:`StreamedRows`), or, without a
        ``cache_file``, not at all (None: the trainer encodes every batch)."""
        t0 = time.perf_counter()
        if cache_file and (_shards(cache_file) / "index.json").is_file():
            return StreamedRows(self.adapter, self.ds, self.res, _shards(cache_file), 1, self.chunk).fill()
        if cache_file and Path(cache_file).is_file():
            self._read(Path(cache_file))
            self.seconds, self.source = time.perf_counter() - t0, str(cache_file)
            return self
        for start in range(0, len(self.ds), self.chunk):
            items, idx = [], []
            for i in range(start, min(start + self.chunk, len(self.ds))):
                try:
                    items.append(self.ds.load(i, self.res))
                    idx.append(i)
                except BadRow as e:
                    self.bad[i] = str(e)
            groups: dict[tuple, list] = {}  # rows of one image size are encoded together (template buckets)
            for i, it in zip(idx, items):
                groups.setdefault(tuple(it["source"].shape), []).append((i, it))
            for group in groups.values():
                self._store([i for i, _ in group], [it for _, it in group])
            done = len(self.rows) + len(self.bad)  # after every chunk, the first (or only) one too
            if self.nbytes > self.max_bytes or self.nbytes / done * len(self.ds) > self.max_bytes:
                return self._over_budget(cache_file, self.nbytes / done)
        if cache_file and write:
            self._write(Path(cache_file))
        self.seconds = time.perf_counter() - t0
        return self

    def _over_budget(self, cache_file, row_bytes: float) -> "StreamedRows | None":
        """The dataset does not fit data.cache_mb: to disk shards beside ``cache_file``, or (without one) not kept."""
        est = row_bytes * len(self.ds) / 2**20
        self.rows, self.texts, self.edit_texts, self.nbytes = {}, {}, {}, 0
        if cache_file:  # kept on disk in shards that each fit the budget, read row by row
            # whole chunks per shard: rows are encoded in the same groups as in memory (the same values)
            shard_rows = max(1, int(self.max_bytes / max(row_bytes, 1)) // self.chunk) * self.chunk
            print(f"note: the encoded dataset would take about {est:.0f} MB, more than data.cache_mb="
                  f"{self.max_bytes / 2**20:.0f}; encoding it once into {_shards(cache_file)} ({shard_rows} rows "
                  "per file) and reading each batch from there", flush=True)
            return StreamedRows(self.adapter, self.ds, self.res, _shards(cache_file), shard_rows, self.chunk).fill()
        print(f"note: the encoded dataset would take about {est:.0f} MB, more than data.cache_mb="
              f"{self.max_bytes / 2**20:.0f}; encoding every batch instead (set data.cache_dir to encode it once "
              "to disk)", flush=True)
        return None

    def _write(self, path: Path) -> None:
        texts = list(self.texts)
        tensors = {}
        for k, t in enumerate(texts):
            for j, x in enumerate(_parts(self.texts[t])):
                tensors[f"text.{k}.{j}"] = x.cpu().contiguous()
        rows = sorted(self.rows)
        for i in rows:
            src, tgt, _, _, cond = self.rows[i]
            tensors[f"source.{i}"], tensors[f"target.{i}"] = src.cpu().contiguous(), tgt.cpu().contiguous()
            if cond is not None:
                tensors[f"condition_source.{i}"] = cond.cpu().contiguous()
        edits = list(self.edit_texts)
        for k, t in enumerate(edits):
            for j, x in enumerate(_parts(self.edit_texts[t])):
                tensors[f"edit.{k}.{j}"] = x.cpu().contiguous()
        meta = {"texts": texts, "tuple": isinstance(next(iter(self.texts.values()), None), tuple),
                "edit_texts": edits, "edit_tuple": isinstance(next(iter(self.edit_texts.values()), None), tuple),
                "rows": {str(i): [texts.index(self.rows[i][2]), self.rows[i][3]] for i in rows},
                "bad": {str(i): r for i, r in self.bad.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        try:
            save_file(tensors, str(tmp), metadata={"hywu.encoded": json.dumps(meta)})
            os.replace(tmp, path)
        except OSError as e:  # a cache, not the run: go on without it
            print(f"note: could not write the encodings cache {path} ({e.strerror or e}); continuing", flush=True)
            tmp.unlink(missing_ok=True)

    def _read(self, path: Path) -> None:
        dev = self.adapter.device
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads(f.metadata()["hywu.encoded"])
            t = {k: f.get_tensor(k).to(dev) for k in f.keys()}
        for k, text in enumerate(meta["texts"]):
            parts = [t[f"text.{k}.{j}"] for j in range(sum(1 for x in t if x.startswith(f"text.{k}.")))]
            self.texts[text] = tuple(parts) if meta["tuple"] else parts[0]
        for k, text in enumerate(meta.get("edit_texts", ())):  # none in an older file: its edits are among the texts
            parts = [t[f"edit.{k}.{j}"] for j in range(sum(1 for x in t if x.startswith(f"edit.{k}.")))]
            self.edit_texts[text] = tuple(parts) if meta["edit_tuple"] else parts[0]
        for i, (k, task) in meta["rows"].items():
            self.rows[int(i)] = (t[f"source.{i}"], t[f"target.{i}"], meta["texts"][k], task, t.get(f"condition_source.{i}"))
        self.bad = {int(i): r for i, r in meta["bad"].items()}
        self.nbytes = sum(v.numel() * v.element_size() for v in t.values())

    def _text_key(self, i: int, sentence: str) -> str:
        # a text encoder that sees the source image (Qwen-Image-Edit) gives every row its own text
        return f"{sentence}\x00{i}" if self.adapter.text_sees_image else sentence

    def _store(self, idx: list[int], items: list[dict]) -> None:
        """Latents of the chunk's sources and targets; text items of the instructions not kept
        yet, then generator items of the edit sentences that are no instruction (per row where
        the text sees the image)."""
        a = self.adapter
        sources = torch.stack([it["source"] for it in items])
        lat, tgt = a.source_latents(sources), a.latent(torch.stack([it["target"] for it in items]))
        src, cond = lat["source"], lat.get("condition_source")
        rows = list(enumerate(zip(idx, items)))
        self._keep(self.texts, [(k, i, it["instruction"]) for k, (i, it) in rows], sources,
                   lambda sentences, *images: a.text_items(a.training_text(sentences, *images)))
        self._keep(self.edit_texts, [(k, i, e) for k, (i, it) in rows for e in it.get("edits", ())], sources,
                   a.generator_text_items)
        for k, (i, it) in rows:
            self.rows[i] = (src[k], tgt[k], self._text_key(i, it["instruction"]), it["task"], None if cond is None else cond[k])
        self.nbytes += _nbytes(src) + _nbytes(tgt) + (0 if cond is None else _nbytes(cond))

    def _keep(self, store: dict, sentences: list[tuple[int, int, str]], sources: torch.Tensor, encode) -> None:
        """Encode, in one call, the sentences not kept yet, and keep them in ``store``
        (``sentences``: (place in the chunk, row index, sentence))."""
        new: dict[str, tuple[str, int]] = {}  # key -> (sentence, the row's place in the chunk)
        for k, i, sentence in sentences:
            key = self._text_key(i, sentence)
            if key not in self.texts and key not in store and key not in new:
                new[key] = (sentence, k)
        if new:
            images = (sources[[k for _, k in new.values()]],) if self.adapter.text_sees_image else ()
            for key, item in zip(new, encode([t for t, _ in new.values()], *images)):
                store[key] = item
                self.nbytes += _nbytes(item)

    def load(self, i: int) -> dict:
        """Row ``i`` encoded; raises BadRow for a row the data could not give."""
        if i in self.bad:
            raise BadRow(self.bad[i])
        src, tgt, text, task, cond = self.rows[i]
        edits = self.ds.edits(i)
        edit_text = [self._edit_item(self._text_key(i, e)) for e in edits] or [self._edit_item(text)]  # no edits: one edit
        return {"source": src, "target": tgt, "text": self.texts[text], "instruction": text.split("\x00")[0], "task": task,
                "edits": edits, "edit_text": None if any(t is None for t in edit_text) else edit_text,
                **({} if cond is None else {"condition_source": cond})}

    def _edit_item(self, key: str):
        """What the generator reads of a sentence's text; None where it was not encoded."""
        if key in self.edit_texts:
            return self.edit_texts[key]
        return self.adapter.generator_item(self.texts[key]) if key in self.texts else None

    def collate(self, items: list[dict], task_index: dict[str, int]) -> dict:
        """A batch as ``adapter.prepare_encoded`` takes it (``enc``), plus labels."""
        return {
            "enc": {"source": torch.stack([it["source"] for it in items]), "target": torch.stack([it["target"] for it in items]),
                    "text": self.adapter.stack_text([it["text"] for it in items]),
                    **({"condition_source": torch.stack([it["condition_source"] for it in items])}
                       if "condition_source" in items[0] else {})},
            "instruction": [it["instruction"] for it in items],
            "task": [it["task"] for it in items],
            "task_id": torch.tensor([task_index.get(it["task"], -1) for it in items], dtype=torch.long),
            "edits": [it["edits"] for it in items],
            # every edit's generator item, row by row (trainer.edits.EditPlan); None: some were not encoded
            "edit_text": (None if any(it["edit_text"] is None for it in items)
                          else [t for it in items for t in it["edit_text"]]),
        }

    def summary(self) -> dict:
        return {"rows": len(self.rows), "bad_rows": len(self.bad), "instructions": len(self.texts), "edits": len(self.edit_texts),
                "mb": round(self.nbytes / 2**20, 1), "seconds": round(self.seconds, 2), "from_disk": self.source}


class StreamedRows(EncodedRows):
    """The encodings of a dataset larger than ``data.cache_mb``, kept on disk under ``data.cache_dir``:
    encoded once, ``shard_rows`` consecutive rows at a time (what fits the budget), each shard written
    as its own safetensors file; a batch reads its rows' tensors from the memory-mapped shards, so
    memory holds the index only. ``index.json`` is written last: a folder without it is encoded again."""

    def __init__(self, adapter, dataset: EditDataset, resolution: int, folder: Path, shard_rows: int, chunk: int = 16):
        super().__init__(adapter, dataset, resolution, max_mb=UNBOUNDED_MB, chunk=chunk)
        self.folder, self.shard_rows = Path(folder), max(1, shard_rows)
        self._open: dict[int, tuple] = {}  # shard -> (safe_open handle, row -> text index, edit key -> index, meta)

    @torch.no_grad()
    def fill(self, cache_file=None, write: bool = True) -> "StreamedRows":
        t0 = time.perf_counter()
        index = self.folder / "index.json"
        if index.is_file():
            meta = json.loads(index.read_text())
            self.shard_rows, self.bad = int(meta["shard_rows"]), {int(i): r for i, r in meta["bad"].items()}
            self.source = str(self.folder)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            for s, start in enumerate(range(0, len(self.ds), self.shard_rows)):
                rows = range(start, min(start + self.shard_rows, len(self.ds)))
                part = EncodedRows(self.adapter, _Shifted(self.ds, start, len(rows)), self.res, UNBOUNDED_MB, self.chunk)
                part.fill()
                part._write(self._shard(s))
                self.bad.update({start + i: r for i, r in part.bad.items()})
            tmp = index.with_name(f".tmp-{os.getpid()}-index.json")
            tmp.write_text(json.dumps({"shard_rows": self.shard_rows, "rows": len(self.ds), "bad": {str(i): r for i, r in self.bad.items()}}))
            os.replace(tmp, index)
        self.nbytes = sum(p.stat().st_size for p in self.folder.glob("part-*.safetensors"))
        self.seconds = time.perf_counter() - t0
        return self

    def _shard(self, s: int) -> Path:
        return self.folder / f"part-{s:05d}.safetensors"

    def _handle(self, s: int):
        """Shard ``s`` opened once: (handle, metadata, text -> index, edit -> index, its keys, parts per text item)."""
        if s not in self._open:
            f = safe_open(str(self._shard(s)), framework="pt", device="cpu")
            meta = json.loads(f.metadata()["hywu.encoded"])
            keys = set(f.keys())
            parts = Counter(k.rsplit(".", 1)[0] for k in keys if k.startswith(("text.", "edit.")))
            self._open[s] = (f, meta, {t: k for k, t in enumerate(meta["texts"])},
                             {t: k for k, t in enumerate(meta.get("edit_texts", ()))}, keys, parts)
        return self._open[s]

    def load(self, i: int) -> dict:
        if i in self.bad:
            raise BadRow(self.bad[i])
        s, j = divmod(i, self.shard_rows)
        f, meta, text_index, edit_index, keys, parts = self._handle(s)
        dev = self.adapter.device

        def get(key):
            return f.get_tensor(key).to(dev)

        def item(kind: str, k: int):
            got = [get(f"{kind}.{k}.{n}") for n in range(parts[f"{kind}.{k}"])]
            return tuple(got) if meta["tuple" if kind == "text" else "edit_tuple"] else got[0]

        k, task = meta["rows"][str(j)]
        text_key = meta["texts"][k]
        edits = self.ds.edits(i)
        edit_text = []
        for e in edits or [None]:
            key = text_key if e is None else self._text_key(j, e)
            if key in edit_index:
                edit_text.append(item("edit", edit_index[key]))
            elif key in text_index:
                edit_text.append(self.adapter.generator_item(item("text", text_index[key])))
            else:
                edit_text.append(None)
        cond = get(f"condition_source.{j}") if f"condition_source.{j}" in keys else None
        return {"source": get(f"source.{j}"), "target": get(f"target.{j}"), "text": item("text", k),
                "instruction": text_key.split("\x00")[0], "task": task, "edits": edits,
                "edit_text": None if any(t is None for t in edit_text) else edit_text,
                **({} if cond is None else {"condition_source": cond})}

    def summary(self) -> dict:
        return {**super().summary(), "rows": len(self.ds) - len(self.bad), "streamed_from": str(self.folder),
                "shards": len(list(self.folder.glob("part-*.safetensors")))}


class _Shifted:
    """Rows ``start .. start + n`` of a dataset, numbered from 0 (one shard's rows)."""

    def __init__(self, ds, start: int, n: int):
        self._ds, self._start, self._n = ds, start, n

    def __len__(self):
        return self._n

    def load(self, i, resolution):
        return self._ds.load(self._start + i, resolution)

    def edits(self, i):
        return self._ds.edits(self._start + i)


def _shards(cache_file) -> Path:
    """The folder of a dataset's encodings on disk in shards, beside its single-file name."""
    p = Path(cache_file)
    return p.with_name(p.stem + "-shards")


def _parts(item) -> tuple:
    return item if isinstance(item, tuple) else (item,)


def cache_key(cfg, dtype: torch.dtype) -> str:
    """Names the encodings of ``cfg``'s base and training data: any change of the base's files
    (size, mtime), of the data settings, the resolution or the dtype gives another file."""
    b, d = cfg.base, cfg.data
    files = []
    if b.path and Path(b.path).is_dir():
        for p in sorted(Path(b.path).rglob("*")):
            if p.is_file() and p.suffix in (".safetensors", ".json", ".txt", ".model"):
                st = p.stat()
                files.append([str(p.relative_to(b.path)), st.st_size, st.st_mtime_ns])
    data_files = []
    if d.source == "folders" and d.path:  # the pairs are files: every image, instruction and sidecar counts
        from .data import folder_pair

        for folder in folder_pair(d.path, d.control_path):
            for p in (sorted(f for f in folder.iterdir() if f.is_file()) if folder is not None and folder.is_dir() else ()):
                st = p.stat()
                data_files.append([str(p), st.st_size, st.st_mtime_ns])
    elif d.path and Path(d.path).exists():
        for p in ([Path(d.path)] if Path(d.path).is_file() else sorted(Path(d.path).rglob("*.parquet"))):
            st = p.stat()
            data_files.append([str(p), st.st_size, st.st_mtime_ns])
    key = {"family": b.family, "base": str(Path(b.path).resolve()) if b.path else "", "files": files,
           "synthetic_full": b.synthetic_full, "resolution": b.resolution, "text_tokens": b.text_tokens,
           "text_layer": b.text_layer, "text_mask": b.text_mask,
           "source": d.source, "data": d.path, "data_files": data_files, "n_train": d.n_train, "tasks": d.tasks,
           "seed": cfg.train.seed if d.source == "synthetic" else None, "dtype": str(dtype), "version": 2}
    if b.files:  # ComfyUI single files as components (keys without them unchanged)
        key["single_files"] = sorted([sub, str(Path(p).resolve()), *((Path(p).stat().st_size, Path(p).stat().st_mtime_ns)
                                                                    if Path(p).is_file() else ())] for sub, p in b.files.items())
    if b.buckets != "square":  # template buckets (keys of square runs unchanged)
        key["buckets"] = [b.buckets, b.megapixels]
    if b.vl_pixels is not None or b.reference_pixels is not None:  # qwen image sizes (keys without them unchanged)
        key["qwen_pixels"] = [b.vl_pixels, b.reference_pixels]
    from .replay import key as replay_key

    if replay_key(cfg) is not None:  # replay rows are part of the training set (keys without replay unchanged)
        key["replay"] = replay_key(cfg)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
