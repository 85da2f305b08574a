"""The HY-WU parameter generator.

Learned parameter queries (one per rank-anchored token slot) are refined by blocks of
  self-attention along the layer axis -> self-attention within a layer ->
  cross-attention to the condition tokens -> feed-forward,
each pre-RMSNorm with a residual. The condition enters through cross-attention (and, with
``film``, a per-block scale and shift of the queries from the pooled text). Separate heads write
A- and B-tokens; the B head starts at zero, so a fresh generator's LoRAs are zero and the patched
base equals the base.

Options that make the generator use the request (measured in docs/demo.md):
  * ``condition_norm``: condition tokens are standardised with statistics of the training set,
    stored in the file. A text encoder's hidden states share a large component across every
    prompt; removing it makes what differs between requests the largest part of the input.
  * ``shared_rank``: a learned static LoRA inside the generator; the generated LoRA is a
    residual on top of it (ranks concatenated). The average update is learned as fast as a plain
    LoRA learns it; the generator only has to learn what differs.
  * ``film``: the masked mean of the text tokens scales and shifts the parameter queries before
    every block, a direct global path from the instruction to every token.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .conditions import Condition, ConditionSpec
from .functional_lora import GeneratedLoRA
from .layers import Attention, FeedForward, RMSNorm, rope_angles, rope_angles_2d
from .targets import TargetSpec
from .tokenizer import ParameterTokenizer

CONDITION_NORMS = ("none", "feature", "token")

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_blocks=2, n_heads=4, token_width=16),  # tests and micro bases
    "small": dict(d_model=384, n_blocks=6, n_heads=6, token_width=128),  # SD1.5-sized bases (w 128: half the tokens of 64, half the step)
    "medium": dict(d_model=1024, n_blocks=12, n_heads=16, token_width=128),
    "large": dict(d_model=2048, n_blocks=24, n_heads=16, token_width=128),  # DiT bases on big GPUs
}


@dataclass
class GeneratorConfig:
    d_model: int = 64
    n_blocks: int = 2
    n_heads: int = 4
    ffn_mult: float = 4.0
    token_width: int = 16
    rank: int = 16
    alpha: float = 64.0
    row_tokens: int | None = None  # tokens per grid row; None = chosen from the target spec
    gradient_checkpointing: bool = False
    condition_norm: str = "none"  # none | feature | token: standardise condition tokens with stored statistics
    shared_rank: int = 0  # > 0: a learned static LoRA of this rank; the generated LoRA is a residual on it
    film: bool = False  # scale/shift the parameter queries before each block from the pooled text

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "GeneratorConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown generator preset '{preset}'; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> "GeneratorConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown generator config field(s) {sorted(unknown)}")
        return cls(**data)

    def __post_init__(self):
        if self.condition_norm not in CONDITION_NORMS:
            raise ValueError(f"condition_norm must be one of {', '.join(CONDITION_NORMS)}, got {self.condition_norm!r}")
        if self.shared_rank < 0:
            raise ValueError(f"shared_rank must be 0 (off) or positive, got {self.shared_rank}")

    def to_dict(self) -> dict:
        return asdict(self)


class GeneratorBlock(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_layers, self.attn_layers = RMSNorm(d), Attention(d, cfg.n_heads)
        self.norm_inlayer, self.attn_inlayer = RMSNorm(d), Attention(d, cfg.n_heads)
        self.norm_cross, self.attn_cross = RMSNorm(d), Attention(d, cfg.n_heads)
        self.norm_ffn, self.ffn = RMSNorm(d), FeedForward(d, cfg.ffn_mult)

    def forward(self, x, context, context_mask, slot_mask, layer_angles, inlayer_angles, film=None):
        b, n, p, d = x.shape
        if film is not None:  # (b, 2, d): scale and shift of every query from the pooled text
            x = x * (1 + film[:, 0, None, None]) + film[:, 1, None, None]
        # Along the layer axis: sequence = layers, batched over positions.
        h = self.norm_layers(x).transpose(1, 2).reshape(b * p, n, d)
        key_mask = slot_mask.t().unsqueeze(0).expand(b, p, n).reshape(b * p, n)
        h = self.attn_layers(h, key_mask=key_mask, angles=layer_angles)
        x = x + h.view(b, p, n, d).transpose(1, 2)
        # Within a layer: sequence = positions, batched over layers.
        h = self.norm_inlayer(x).reshape(b * n, p, d)
        key_mask = slot_mask.unsqueeze(0).expand(b, n, p).reshape(b * n, p)
        h = self.attn_inlayer(h, key_mask=key_mask, angles=inlayer_angles)
        x = x + h.view(b, n, p, d)
        # Cross-attention to the condition tokens.
        h = self.attn_cross(self.norm_cross(x).view(b, n * p, d), context=context, key_mask=context_mask)
        x = x + h.view(b, n, p, d)
        return x + self.ffn(self.norm_ffn(x))


class HYWUGenerator(nn.Module):
    def __init__(self, config: GeneratorConfig, targets: TargetSpec, conditions: ConditionSpec,
                 index_buffers: bool = True):
        """``index_buffers=False`` skips the grid-sized index buffers (for a shape check on 'meta';
        call :meth:`register_index_buffers` before use)."""
        super().__init__()
        if (config.d_model // config.n_heads) % 4:
            raise ValueError("d_model / n_heads must be divisible by 4 (2D rotary embedding)")
        self.tokenizer = tok = ParameterTokenizer(targets, config.rank, config.token_width, config.row_tokens)
        # Record the resolved row length so a saved generator rebuilds the same grid.
        self.config = config = replace(config, row_tokens=tok.row_tokens)
        self.target_spec, self.condition_spec = targets, conditions
        d, n, p = config.d_model, tok.n_rows, tok.n_positions
        token_dim = config.rank * config.token_width

        # Parameter queries: input-independent learned embeddings.
        self.layer_embed = nn.Parameter(torch.randn(n, d) * 0.02)
        self.position_embed = nn.Parameter(torch.randn(p, d) * 0.02)
        self.part_embed = nn.Parameter(torch.randn(2, d) * 0.02)  # A-token vs B-token

        self.cond_proj = nn.ModuleDict({s.name: nn.Linear(s.width, d) for s in conditions.sources})
        self.cond_pos = nn.ParameterDict({s.name: nn.Parameter(torch.randn(s.max_tokens, d) * 0.02) for s in conditions.sources})
        self.cond_norm = RMSNorm(d)
        if config.condition_norm != "none":
            # Training-set statistics (set by the trainer before training, saved with the weights).
            for s in conditions.sources:
                rows = s.max_tokens if config.condition_norm == "token" else 1
                self.register_buffer(f"cond_mean_{s.name}", torch.zeros(rows, s.width))
                self.register_buffer(f"cond_std_{s.name}", torch.ones(rows, s.width))
        if config.film:
            self.film = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2 * d * config.n_blocks))
            nn.init.zeros_(self.film[2].weight)
            nn.init.zeros_(self.film[2].bias)
        if config.shared_rank:
            # A static LoRA (PEFT init: A ~ U(+-1/sqrt(d_in)), B = 0) the generated one adds to.
            r = config.shared_rank
            self.shared_a = nn.ParameterList(nn.Parameter(torch.empty(r, t.d_in).uniform_(-t.d_in ** -0.5, t.d_in ** -0.5))
                                             for t in targets.targets)
            self.shared_b = nn.ParameterList(nn.Parameter(torch.zeros(t.d_out, r)) for t in targets.targets)

        self.blocks = nn.ModuleList(GeneratorBlock(config) for _ in range(config.n_blocks))
        self.out_norm = RMSNorm(d)
        self.head_a = nn.Linear(d, token_dim)
        self.head_b = nn.Linear(d, token_dim)
        nn.init.zeros_(self.head_b.weight)
        nn.init.zeros_(self.head_b.bias)

        if index_buffers:
            self.register_index_buffers()

    def register_index_buffers(self) -> None:
        """Slot masks, rotary angles and head scatter indices, derived from the specs (always
        built on the CPU, so a generator materialised from 'meta' can rebuild them)."""
        tok, cfg = self.tokenizer, self.config
        n, head_dim = tok.n_rows, cfg.d_model // cfg.n_heads
        self.register_buffer("slot_mask", tok.mask, persistent=False)
        self.register_buffer("slot_part", tok.part, persistent=False)
        self.register_buffer("layer_angles", rope_angles(torch.arange(n, device="cpu"), head_dim), persistent=False)
        self.register_buffer("inlayer_angles", rope_angles_2d(tok.part, tok.chunk, head_dim), persistent=False)
        flat_mask, flat_part = tok.mask.flatten(), tok.part.flatten()
        self.register_buffer("a_slots", torch.nonzero(flat_mask & (flat_part == 0)).squeeze(1), persistent=False)
        self.register_buffer("b_slots", torch.nonzero(flat_mask & (flat_part == 1)).squeeze(1), persistent=False)
        # A entries are scaled by 1/sqrt(d_in) so x @ A^T stays O(1) whatever the layer width.
        d_in = torch.tensor([t.d_in ** -0.5 for t in self.target_spec.targets], device="cpu")
        a_scale = d_in.repeat_interleave(torch.tensor(tok.a_chunks, device="cpu"))
        self.register_buffer("a_scale", a_scale[:, None], persistent=False)

    @property
    def scale(self) -> float:
        return self.config.alpha / self.config.rank

    @torch.no_grad()
    def set_condition_stats(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store per-source (mean, std) of the training set's condition tokens; shapes (T, W) or
        (1, W) as ``condition_norm`` is 'token' or 'feature' (see :func:`condition_statistics`)."""
        for s in self.condition_spec.sources:
            mean, std = stats[s.name]
            getattr(self, f"cond_mean_{s.name}").copy_(mean)
            getattr(self, f"cond_std_{s.name}").copy_(std)

    def encode_condition(self, cond: Condition) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Condition -> (context tokens, their mask, pooled text for FiLM or None)."""
        cond.validate(self.condition_spec)
        dtype = self.layer_embed.dtype
        tokens, masks, pooled = [], [], None
        for s in self.condition_spec.sources:
            t = cond.tokens[s.name].to(self.layer_embed.device, dtype)
            if self.config.condition_norm != "none":
                n = t.shape[1]
                mean, std = getattr(self, f"cond_mean_{s.name}"), getattr(self, f"cond_std_{s.name}")
                t = (t - mean[:n].to(dtype)) / std[:n].to(dtype)
            mask = cond.mask(s.name).to(self.layer_embed.device)
            h = self.cond_proj[s.name](t)
            if self.config.film and pooled is None and s.kind == "text_hidden_states":
                w = mask.to(dtype).unsqueeze(-1)
                pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
            tokens.append(h + self.cond_pos[s.name][: t.shape[1]])
            masks.append(mask)
        return self.cond_norm(torch.cat(tokens, 1)), torch.cat(masks, 1), pooled

    def tokens(self, cond: Condition) -> torch.Tensor:
        """Condition -> generated token grid (batch, rows, positions, rank, token_width)."""
        context, context_mask, pooled = self.encode_condition(cond)
        b = context.shape[0]
        n, p = self.slot_mask.shape
        x = self.layer_embed[:, None] + self.position_embed[None] + self.part_embed[self.slot_part]
        x = x.unsqueeze(0).expand(b, n, p, -1)
        inlayer_angles = self.inlayer_angles.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * n, 1, p, -1)
        args = (context, context_mask, self.slot_mask, self.layer_angles, inlayer_angles)
        films = [None] * len(self.blocks)
        if self.config.film:
            if pooled is None:
                raise ValueError("film needs a text condition source (kind text_hidden_states)")
            films = self.film(pooled).view(b, len(self.blocks), 2, -1).unbind(1)
        for block, film in zip(self.blocks, films):
            if self.config.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, *args, film, use_reentrant=False)
            else:
                x = block(x, *args, film)
        x = self.out_norm(x).reshape(b, n * p, -1)
        r, w = self.config.rank, self.config.token_width
        out = x.new_zeros(b, n * p, r * w)
        out = out.index_copy(1, self.a_slots, self.head_a(x[:, self.a_slots]) * self.a_scale.to(x.dtype))
        out = out.index_copy(1, self.b_slots, self.head_b(x[:, self.b_slots]))
        return out.view(b, n, p, r, w)

    def forward(self, cond: Condition) -> GeneratedLoRA:
        """One LoRA per condition in the batch: the generated one, plus the shared part if any.
        (Everything happens inside forward, so DDP/FSDP wrappers see every parameter used.)"""
        weights = self.tokenizer.detokenize(self.tokens(cond))
        if self.config.shared_rank:
            b = next(iter(weights.values()))[0].shape[0]
            for t, sa, sb in zip(self.target_spec.targets, self.shared_a, self.shared_b):
                a, bb = weights[t.name]
                weights[t.name] = (torch.cat([a, sa.to(a.dtype).expand(b, -1, -1)], 1),
                                   torch.cat([bb, sb.to(bb.dtype).expand(b, -1, -1)], 2))
        return GeneratedLoRA(weights, self.scale)

    def generate(self, cond: Condition) -> GeneratedLoRA:
        """One LoRA per condition in the batch (the same as calling the generator)."""
        return self(cond)


def without_shared(lora: GeneratedLoRA, shared_rank: int) -> GeneratedLoRA:
    """A generator's LoRA without its shared rank (forward joins that static part last): what the
    second and later edits of a chain add, since the first edit's LoRA already carries it."""
    if not shared_rank:
        return lora
    keep = lora.rank - shared_rank
    if keep < 1:
        raise ValueError(f"a LoRA of rank {lora.rank} has no generated part beside a shared rank of {shared_rank}")
    return GeneratedLoRA({k: (a[:, :keep], b[:, :, :keep]) for k, (a, b) in lora.weights.items()}, lora.scale)


def describe(config: GeneratorConfig, targets: TargetSpec, conditions: ConditionSpec) -> dict:
    """Sizes of a generator for a target spec, without allocating its weights."""
    with torch.device("meta"):
        gen = HYWUGenerator(config, targets, conditions, index_buffers=False)
    tok = gen.tokenizer
    return {
        "targets": len(targets.targets),
        "parameter_tokens": tok.n_tokens,
        "token_grid": [tok.n_rows, tok.n_positions],
        "generated_elements": targets.lora_elements(config.rank),
        "generator_parameters": sum(p.numel() for p in gen.parameters()),
    }


@torch.no_grad()
def condition_statistics(conditions, spec: ConditionSpec, mode: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-source (mean, std) over an iterable of :class:`Condition` batches, counting only the
    unmasked tokens: per position and feature (``mode='token'``, shape (T, W)) or per feature
    (``'feature'``, shape (1, W)). A std that is tiny next to the source's typical std (a
    position that never varies) is raised to it, so standardising never blows up noise."""
    sums: dict[str, list] = {}
    for cond in conditions:
        for s in spec.sources:
            t = cond.tokens[s.name].double()
            m = cond.mask(s.name).double().unsqueeze(-1)
            if mode == "feature":  # every token is a sample of the same features
                t, m = t.reshape(-1, 1, t.shape[-1]), m.reshape(-1, 1, 1)
            acc = sums.setdefault(s.name, [0.0, 0.0, 0.0])
            acc[0] = acc[0] + m.sum(0)
            acc[1] = acc[1] + (t * m).sum(0)
            acc[2] = acc[2] + (t * t * m).sum(0)
    out = {}
    for s in spec.sources:
        n, s1, s2 = sums[s.name]
        rows = s.max_tokens if mode == "token" else 1
        count = n.clamp_min(1.0)
        mean = s1 / count
        var = (s2 / count - mean ** 2).clamp_min(0.0)
        seen = (n > 0).squeeze(-1)
        typical = var[seen].mean().sqrt() if seen.any() else torch.tensor(1.0, dtype=torch.float64)
        std = var.sqrt().clamp_min(0.1 * float(typical) + 1e-6)
        full_mean = torch.zeros(rows, s.width, dtype=torch.float64)
        full_std = torch.ones(rows, s.width, dtype=torch.float64) * float(typical)
        full_mean[: mean.shape[0]] = mean
        full_std[: std.shape[0]] = torch.where(seen[:, None], std, full_std[: std.shape[0]])
        out[s.name] = (full_mean.float(), full_std.float())
    return out
