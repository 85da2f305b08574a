"""Pre-encoded training rows: what is frozen and deterministic per example is computed once.

The base, its VAE and its text encoder never change while a generator trains, so the latents
of a row's source and target images and the text features of its instruction (from which the
generator's condition is assembled) are the same at every visit. :class:`EncodedRows` encodes
the rows before the first step, in fixed chunks of consecutive rows, in index order: the
values do not depend on the data order, the process, or where a run resumed, so resuming and
data-parallel slicing stay exact. Noise, timesteps and CFG dropout are still drawn per step
and per global sample slot (``families.base.sample_generators``).

Memory is bounded (``data.cache_mb``): rows beyond it are encoded when the stream reaches them,
one row at a time, and not kept. Text features are kept once per distinct instruction.
"""
from __future__ import annotations

import time

import torch

from .data import BadRow, EditDataset


def _nbytes(x) -> int:
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size()


class EncodedRows:
    def __init__(self, adapter, dataset: EditDataset, resolution: int, max_mb: float, chunk: int = 16):
        self.adapter, self.ds, self.res, self.chunk = adapter, dataset, resolution, max(1, chunk)
        self.max_bytes = int(max_mb * 2**20)
        self.rows: dict[int, tuple] = {}  # index -> (source latent, target latent, instruction, task)
        self.texts: dict[str, object] = {}  # instruction -> text item (adapter.text_items)
        self.bad: dict[int, str] = {}  # index -> reason (counted by the stream when it reaches the row)
        self.nbytes, self.seconds, self.complete = 0, 0.0, True

    @torch.no_grad()
    def fill(self) -> "EncodedRows":
        """Encode rows in index order, ``chunk`` at a time, until the memory budget is used."""
        t0 = time.perf_counter()
        for start in range(0, len(self.ds), self.chunk):
            if self.nbytes >= self.max_bytes:
                self.complete = False
                break
            items, idx = [], []
            for i in range(start, min(start + self.chunk, len(self.ds))):
                try:
                    items.append(self.ds.load(i, self.res))
                    idx.append(i)
                except BadRow as e:
                    self.bad[i] = str(e)
            if items:
                self._store(idx, items)
        self.seconds = time.perf_counter() - t0
        return self

    def _encode(self, items: list[dict], instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list]:
        a = self.adapter
        src = a.latent(torch.stack([it["source"] for it in items]))
        tgt = a.latent(torch.stack([it["target"] for it in items]))
        return src, tgt, a.text_items(a.encode_text(instructions)) if instructions else []

    def _store(self, idx: list[int], items: list[dict]) -> None:
        new = list(dict.fromkeys(it["instruction"] for it in items if it["instruction"] not in self.texts))
        src, tgt, texts = self._encode(items, new)
        for t, item in zip(new, texts):
            self.texts[t] = item
            self.nbytes += _nbytes(item)
        for k, (i, it) in enumerate(zip(idx, items)):
            self.rows[i] = (src[k], tgt[k], it["instruction"], it["task"])
        self.nbytes += _nbytes(src) + _nbytes(tgt)

    @torch.no_grad()
    def load(self, i: int) -> dict:
        """Row ``i`` encoded (cached, or encoded now when beyond the budget); BadRow as the data does."""
        if i in self.bad:
            raise BadRow(self.bad[i])
        if i in self.rows:
            src, tgt, text, task = self.rows[i]
            return {"source": src, "target": tgt, "text": self.texts[text], "instruction": text, "task": task}
        it = self.ds.load(i, self.res)
        src, tgt, texts = self._encode([it], [it["instruction"]])
        return {"source": src[0], "target": tgt[0], "text": texts[0], "instruction": it["instruction"], "task": it["task"]}

    def collate(self, items: list[dict], task_index: dict[str, int]) -> dict:
        """A batch as ``adapter.prepare_encoded`` takes it (``enc``), plus labels."""
        return {
            "enc": {"source": torch.stack([it["source"] for it in items]), "target": torch.stack([it["target"] for it in items]),
                    "text": self.adapter.stack_text([it["text"] for it in items])},
            "instruction": [it["instruction"] for it in items],
            "task": [it["task"] for it in items],
            "task_id": torch.tensor([task_index.get(it["task"], -1) for it in items], dtype=torch.long),
        }

    def summary(self) -> dict:
        return {"rows": len(self.rows), "of": len(self.ds), "instructions": len(self.texts), "mb": round(self.nbytes / 2**20, 1),
                "seconds": round(self.seconds, 2), "complete": self.complete and len(self.rows) + len(self.bad) == len(self.ds)}
