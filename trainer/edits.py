"""Chained edits: train the generator for several HY-WU edits applied in a row.

A training row may list its instruction as separate edits (``edits: ["make it brighter", "shift
the image left"]`` for "make it brighter and shift the image left"). With ``data.chain_edits``
(the default) the generator writes one LoRA per edit, from the row's source and that edit's
sentence alone, and the row trains with their sum (the LoRAs concatenated along the rank). That
is what two HY-WU Condition Encode -> Generate LoRA -> Apply chains in a row compute in ComfyUI
(example workflow "HY-WU two edits in a row"); the base still reads the row's whole instruction,
as the sampler's prompt does there. A row without edits is one edit, its instruction. The
static-LoRA baselines ignore edits (they never read the instruction).

The generator's shared rank (generator.shared_rank, a static LoRA inside every generated one) is
counted once per row by default (``data.chain_shared: once``): the second and later edits add
only their generated part, as Generate LoRA does with ``include_shared`` off. ``per_edit`` sums
the whole LoRAs (every Generate LoRA of the chain with ``include_shared`` on).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hywu_nodes.core import Condition, GeneratedLoRA, concat_ranks, without_shared

CHAIN_SHARED = ("once", "per_edit")


def _rows(x, index: torch.Tensor):
    if isinstance(x, (tuple, list)):
        return tuple(_rows(t, index) for t in x)
    return x[index.to(x.device)]


@dataclass
class EditPlan:
    """The edits of one batch: every edit's sentence, row by row, and the row each belongs to."""

    texts: list[str]
    owner: torch.Tensor  # (n_edits,) row index of each edit
    counts: list[int]  # edits per row
    shared_once: int = 0  # the generator's shared rank, left out of every edit after a row's first
    text_items: list | None = None  # every edit's generator item (trainer.encoded.EncodedRows), or None
    sources: torch.Tensor | None = None  # the rows' decoded sources (B, 3, H, W): a text that sees the image

    @classmethod
    def of(cls, batch: dict, shared_once: int = 0) -> "EditPlan | None":
        """None when no row of the batch has separate edits (then nothing changes)."""
        edits = batch.get("edits")
        if not edits or not any(edits):
            return None
        texts, owner, counts = [], [], []
        for row, (instruction, row_edits) in enumerate(zip(batch["instruction"], edits)):
            row_edits = list(row_edits) or [instruction]
            texts += row_edits
            owner += [row] * len(row_edits)
            counts.append(len(row_edits))
        return cls(texts, torch.tensor(owner, dtype=torch.long), counts, shared_once, batch.get("edit_text"),
                   batch.get("source"))

    def condition(self, adapter, enc: dict) -> Condition:
        """The generator's condition of every edit from a batch's encodings: the family's own
        training condition (``encoded_condition``) for the row's source and the edit's text (kept
        from the row cache, else encoded now: only what the generator reads)."""
        sub = {k: _rows(enc[k], self.owner) for k in ("source", "condition_source") if k in enc}
        items = self.text_items
        if items is None:
            images = ()
            if adapter.text_sees_image:  # Qwen-Image-Edit: each edit read with its row's image
                if self.sources is None:
                    raise ValueError("a chained batch without its source images or encoded edits")
                images = (self.sources[self.owner.to(self.sources.device)],)
            items = adapter.generator_text_items(self.texts, *images)
        sub["text"] = adapter.stack_generator_text(items)
        return adapter.encoded_condition(sub)

    def image_condition(self, adapter, source01: torch.Tensor) -> Condition:
        """The same from decoded source images (B, 3, H, W), as sampling encodes it."""
        return adapter.encode_condition(source01[self.owner.to(source01.device)], self.texts)

    def chain(self, lora: GeneratedLoRA) -> GeneratedLoRA:
        """One LoRA per row from one per edit: the sum of the row's edits (joined along the rank;
        a row with fewer edits than the batch's most gets zero slots, which add nothing)."""
        starts = torch.tensor([0, *self.counts[:-1]]).cumsum(0)
        counts, n_edits = torch.tensor(self.counts), len(self.texts)
        padded = {k: (torch.cat([a, a.new_zeros(1, *a.shape[1:])]), torch.cat([b, b.new_zeros(1, *b.shape[1:])]))
                  for k, (a, b) in lora.weights.items()}  # index n_edits is the zero slot
        slots = []
        for j in range(max(self.counts)):
            index = torch.where(j < counts, starts + j, n_edits)  # each row's j-th edit
            slot = GeneratedLoRA({k: (a[index.to(a.device)], b[index.to(b.device)]) for k, (a, b) in padded.items()},
                                 lora.scale)
            slots.append(without_shared(slot, self.shared_once) if j else slot)
        return concat_ranks(slots)


@dataclass(frozen=True)
class Chaining:
    """How a run trains rows with edits: ``shared_once`` is the shared rank counted once per row
    (0: every edit's whole LoRA is summed)."""

    shared_once: int = 0

    @classmethod
    def of(cls, cfg, method_name: str) -> "Chaining | None":
        """None when the run does not chain edits (data.chain_edits off, or a static-LoRA method)."""
        if not (cfg.data.chain_edits and method_name == "hywu"):
            return None
        return cls(cfg.generator.shared_rank if cfg.data.chain_shared == "once" else 0)

    def plan(self, batch: dict) -> EditPlan | None:
        return EditPlan.of(batch, self.shared_once)
