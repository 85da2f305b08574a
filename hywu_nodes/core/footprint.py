"""How much memory a generator needs, estimated from a generator built on the 'meta' device
(nothing allocated), so a file that cannot fit is refused before any of it is loaded."""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3


@dataclass(frozen=True)
class Footprint:
    """Bytes, estimated: ``weights`` at the load dtype, ``index_tables`` (token-grid masks,
    rotary angles, slot indices, built on load), ``generate`` (the peak of one generator forward
    for one condition, no gradients, plus the LoRA it writes)."""

    weights: int
    index_tables: int
    generate: int

    @property
    def loaded(self) -> int:
        """Held while the generator is loaded (in RAM, or on the device while it runs)."""
        return self.weights + self.index_tables

    @property
    def running(self) -> int:
        return self.loaded + self.generate

    def describe(self) -> str:
        return (f"weights {self.weights / GIB:.2f} GiB, index tables {self.index_tables / GIB:.2f} GiB, "
                f"one generation {self.generate / GIB:.2f} GiB")


@dataclass(frozen=True)
class MemoryBudget:
    """What may be used: ``ram`` for the loaded generator (and, when ``device`` is None, for
    running it too); ``device`` for running it on an accelerator. None = no limit."""

    ram: int | None = None
    device: int | None = None

    def problem(self, fp: Footprint) -> str | None:
        """None when ``fp`` fits, else a sentence with the numbers."""
        if self.device is None:
            if self.ram is not None and fp.running > self.ram:
                return (f"it needs about {fp.running / GIB:.2f} GiB of memory to load and run ({fp.describe()}), "
                        f"but only {self.ram / GIB:.2f} GiB is available")
            return None
        if self.ram is not None and fp.loaded > self.ram:
            return (f"it needs about {fp.loaded / GIB:.2f} GiB of RAM to load ({fp.describe()}), but only "
                    f"{self.ram / GIB:.2f} GiB is available")
        if fp.running > self.device:
            return (f"it needs about {fp.running / GIB:.2f} GiB on the GPU to run ({fp.describe()}), but the GPU has "
                    f"{self.device / GIB:.2f} GiB")
        return None


def estimate_footprint(generator, itemsize: int) -> Footprint:
    """Memory of ``generator`` (a :class:`HYWUGenerator`, usually on 'meta') with weights and
    activations of ``itemsize`` bytes. Attention is counted as the unfused kernel's score matrix,
    the largest of the three attentions (an upper bound for fused kernels)."""
    cfg, tok = generator.config, generator.tokenizer
    rows, positions = tok.n_rows, tok.n_positions
    grid = rows * positions
    d, heads = cfg.d_model, cfg.n_heads
    half = d // heads // 2  # rotary angles per head
    context = sum(s.max_tokens for s in generator.condition_spec.sources)
    weights = sum(p.numel() for p in generator.parameters()) * itemsize
    # tokenizer mask/part/chunk (bool, int64, int64), in-row rotary angles (float32, built from two
    # halves: x2 while built), A/B slot indices (int64), row angles
    tables = grid * (1 + 8 + 8 + 2 * half * 4 + 8) + rows * half * 4
    scores = 4 * heads * max(rows * positions * positions, positions * rows * rows, grid * context)
    hidden = int(d * cfg.ffn_mult * 2 / 3)
    per_block = max(4 * grid * d * itemsize + scores, 3 * grid * hidden * itemsize)
    rope = 2 * grid * half * itemsize  # cos / sin of the in-row angles
    heads_out = 2 * grid * cfg.rank * cfg.token_width * itemsize
    lora = 2 * 4 * generator.target_spec.lora_elements(cfg.rank)  # detokenized + exported in fp32
    generate = 2 * grid * d * itemsize + per_block + rope + heads_out + lora
    return Footprint(weights, tables, generate)
