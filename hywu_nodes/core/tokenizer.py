"""Rank-anchored 2D parameter tokens.

Every targeted layer has ``A`` (r x d_in) and ``B`` (d_out x r). A token keeps the whole rank
axis and ``w`` consecutive entries of the other axis, so it has shape (r, w): ``A`` is cut
along d_in, ``B`` is transposed and cut along d_out. A layer's tokens (A-tokens, then B-tokens)
fill one row of the grid (row n, position h); a layer with more than ``row_tokens`` tokens
continues on the next rows, so a few very wide layers (e.g. SD1.5's 1280->10240 GEGLU) do not
pad every other row to their length. Short rows are padded, and a mask marks the real slots.
``detokenize(tokenize(lora)) == lora`` exactly.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch

from .targets import TargetSpec

LoRAWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (A (b, r, d_in), B (b, d_out, r))


def auto_row_tokens(token_counts: list[int]) -> int:
    """Row length for these per-layer token counts: at least the median layer (so most layers
    keep a row of their own and in-layer attention sees the whole layer), and among those the
    length that pads the grid least."""
    median = sorted(token_counts)[len(token_counts) // 2]
    candidates = sorted(c for c in set(token_counts) if c >= median)
    return min(candidates, key=lambda cap: (cap * sum(math.ceil(c / cap) for c in token_counts), cap))


class ParameterTokenizer:
    def __init__(self, spec: TargetSpec, rank: int, token_width: int, row_tokens: int | None = None):
        if rank <= 0 or token_width <= 0:
            raise ValueError("rank and token_width must be positive")
        self.spec, self.rank, self.width = spec, rank, token_width
        self.a_chunks = [math.ceil(t.d_in / token_width) for t in spec.targets]
        self.b_chunks = [math.ceil(t.d_out / token_width) for t in spec.targets]
        counts = [a + b for a, b in zip(self.a_chunks, self.b_chunks)]
        self.row_tokens = row_tokens or auto_row_tokens(counts)
        self.rows_per_target = [math.ceil(c / self.row_tokens) for c in counts]
        self.first_row = [0, *itertools.accumulate(self.rows_per_target)][:-1]
        self.n_rows, self.n_positions = sum(self.rows_per_target), self.row_tokens
        flat = self.n_rows * self.n_positions
        # detokenize cuts the flat grid with one split (a slice per target would make autograd
        # build a grid-sized zero tensor per target in backward: half a CPU training step).
        self._split_sizes, self._a_piece = [], []
        pos = 0
        for i, (a, b) in enumerate(zip(self.a_chunks, self.b_chunks)):
            start = self.first_row[i] * self.n_positions
            if start > pos:
                self._split_sizes.append(start - pos)
            self._a_piece.append(len(self._split_sizes))
            self._split_sizes += [a, b]
            pos = start + a + b
        if flat > pos:
            self._split_sizes.append(flat - pos)

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) parameter tokens of one LoRA."""
        return sum(self.a_chunks) + sum(self.b_chunks)

    @functools.cached_property
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask, part, chunk) over the grid, built on first use: a generator built on 'meta' to
        check a file's shapes never allocates grid-sized tables. They live on the CPU (also under
        a 'meta' device context)."""
        flat = self.n_rows * self.n_positions
        mask = torch.zeros(flat, dtype=torch.bool, device="cpu")
        part = torch.zeros(flat, dtype=torch.long, device="cpu")  # 0: A-token, 1: B-token
        chunk = torch.zeros(flat, dtype=torch.long, device="cpu")  # index within A or within B
        for i, (a, b) in enumerate(zip(self.a_chunks, self.b_chunks)):
            start = self.first_row[i] * self.n_positions
            mask[start : start + a + b] = True
            part[start + a : start + a + b] = 1
            chunk[start : start + a] = torch.arange(a, device="cpu")
            chunk[start + a : start + a + b] = torch.arange(b, device="cpu")
        shape = (self.n_rows, self.n_positions)
        return mask.view(shape), part.view(shape), chunk.view(shape)

    @property
    def mask(self) -> torch.Tensor:
        """(rows, positions) bool: True for real token slots."""
        return self._tables[0]

    @property
    def part(self) -> torch.Tensor:
        """(rows, positions) long: 0 for an A-token slot, 1 for a B-token slot."""
        return self._tables[1]

    @property
    def chunk(self) -> torch.Tensor:
        """(rows, positions) long: the token's index within its layer's A or B."""
        return self._tables[2]

    def tokenize(self, lora: LoRAWeights) -> torch.Tensor:
        """LoRA weights -> token grid (batch, rows, positions, r, w); padding is zero."""
        first = lora[self.spec.targets[0].name][0]
        batch, r, w = first.shape[0], self.rank, self.width
        grid = first.new_zeros(batch, self.n_rows * self.n_positions, r, w)
        for i, t in enumerate(self.spec.targets):
            a, b = lora[t.name]
            if a.shape != (batch, r, t.d_in) or b.shape != (batch, t.d_out, r):
                raise ValueError(
                    f"{t.name}: expected A {(batch, r, t.d_in)} and B {(batch, t.d_out, r)}, "
                    f"got {tuple(a.shape)} and {tuple(b.shape)}"
                )
            na, nb = self.a_chunks[i], self.b_chunks[i]
            start = self.first_row[i] * self.n_positions
            grid[:, start : start + na] = _cut(a, na, w)
            grid[:, start + na : start + na + nb] = _cut(b.transpose(1, 2), nb, w)
        return grid.view(batch, self.n_rows, self.n_positions, r, w)

    def detokenize(self, grid: torch.Tensor) -> LoRAWeights:
        """Token grid -> LoRA weights; padded entries are ignored."""
        expected = (self.n_rows, self.n_positions, self.rank, self.width)
        if tuple(grid.shape[1:]) != expected:
            raise ValueError(f"token grid has shape {tuple(grid.shape)}, expected (batch, {', '.join(map(str, expected))})")
        pieces = grid.reshape(grid.shape[0], -1, self.rank, self.width).split(self._split_sizes, dim=1)
        return {
            t.name: (_join(pieces[k], t.d_in), _join(pieces[k + 1], t.d_out).transpose(1, 2))
            for t, k in zip(self.spec.targets, self._a_piece)
        }


def _cut(m: torch.Tensor, n_chunks: int, w: int) -> torch.Tensor:
    """(batch, r, d) -> (batch, n_chunks, r, w), zero-padding d up to n_chunks * w."""
    batch, r, d = m.shape
    m = torch.nn.functional.pad(m, (0, n_chunks * w - d))
    return m.reshape(batch, r, n_chunks, w).permute(0, 2, 1, 3)


def _join(tokens: torch.Tensor, d: int) -> torch.Tensor:
    """(batch, n_chunks, r, w) -> (batch, r, d)."""
    batch, n, r, w = tokens.shape
    return tokens.permute(0, 2, 1, 3).reshape(batch, r, n * w)[..., :d]
