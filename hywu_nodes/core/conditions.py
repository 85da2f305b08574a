"""What the generator is conditioned on.

A :class:`ConditionSpec` names the token sequences a generator reads (for example the base's
text-encoder hidden states for the instruction and tokens of the source image), their widths
and maximum lengths, and how each was extracted. The trainer writes it into the generator
file; the ComfyUI Condition Encode node reads it to produce the same features.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

# How a source's features are extracted; both the trainer and the nodes implement these.
CONDITION_KINDS = (
    "text_hidden_states",  # the base's own text encoder's hidden states (options: layer, final_norm, mask)
    "vae_latent_patches",  # the source image through the base's VAE, latent cut into patches
    "clip_vision_tokens",  # a CLIP/SigLIP vision encoder's last hidden state
)


@dataclass(frozen=True)
class ConditionSource:
    name: str
    kind: str
    width: int
    max_tokens: int
    options: dict = field(default_factory=dict)  # extraction details, e.g. {"patch": 2, "resolution": 64}

    def __post_init__(self):
        if self.kind not in CONDITION_KINDS:
            raise ValueError(f"condition '{self.name}': unknown kind '{self.kind}'; known: {', '.join(CONDITION_KINDS)}")
        if self.width <= 0 or self.max_tokens <= 0:
            raise ValueError(f"condition '{self.name}': width and max_tokens must be positive")
        layer = self.options.get("layer", "last")
        if layer != "last" and not (isinstance(layer, int) and not isinstance(layer, bool) and layer < 0):
            raise ValueError(f"condition '{self.name}': layer must be 'last' or a negative int (-1 = last, -2 = the "
                             f"one before, as CLIP Set Last Layer counts), got {layer!r}")
        if self.options.get("mask", "none") not in ("none", "padding"):
            raise ValueError(f"condition '{self.name}': mask must be 'none' or 'padding', got {self.options['mask']!r}")

    @property
    def text_layer(self) -> int:
        """Which hidden layer a text source reads, counted from the end (-1 = last)."""
        layer = self.options.get("layer", "last")
        return -1 if layer == "last" else int(layer)

    @property
    def padding_mask(self) -> bool:
        """True when the tokens after the prompt's end token are masked out (text sources)."""
        return self.options.get("mask", "none") == "padding"


@dataclass(frozen=True)
class ConditionSpec:
    sources: tuple[ConditionSource, ...]

    def __post_init__(self):
        names = [s.name for s in self.sources]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"condition spec needs one or more uniquely named sources, got {names}")

    def __getitem__(self, name: str) -> ConditionSource:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def to_json(self) -> str:
        return json.dumps([asdict(s) for s in self.sources], sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "ConditionSpec":
        return cls(tuple(ConditionSource(**s) for s in json.loads(text)))


@dataclass
class Condition:
    """A batch of condition tokens: ``tokens[name]`` is (batch, T, width), ``masks[name]`` is
    (batch, T) bool with True for real tokens (all True when omitted)."""

    tokens: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter(self.tokens.values())).shape[0]

    def mask(self, name: str) -> torch.Tensor:
        t = self.tokens[name]
        m = self.masks.get(name)
        return torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m.to(t.device, torch.bool)

    def validate(self, spec: ConditionSpec) -> None:
        """Raise a ValueError that says which source is missing or has the wrong shape."""
        missing = [n for n in spec.names if n not in self.tokens]
        if missing:
            raise ValueError(f"condition is missing source(s) {missing}; the generator expects {spec.names}")
        sizes = {n: self.tokens[n].shape[0] for n in spec.names}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"condition sources have different batch sizes {sizes}; encode them from the same image batch")
        for s in spec.sources:
            t = self.tokens[s.name]
            if t.ndim != 3 or t.shape[-1] != s.width:
                raise ValueError(
                    f"condition '{s.name}' has shape {tuple(t.shape)}; the generator expects (batch, tokens, {s.width})"
                )
            if t.shape[1] > s.max_tokens:
                raise ValueError(f"condition '{s.name}' has {t.shape[1]} tokens; the generator was built for at most {s.max_tokens}")
            if s.padding_mask and s.name not in self.masks:
                raise ValueError(f"condition '{s.name}' has no padding mask; the generator reads only the prompt's own "
                                 "tokens, so the encoder must say which tokens are padding")

    def to(self, device=None, dtype=None) -> "Condition":
        return Condition(
            {k: v.to(device=device, dtype=dtype) for k, v in self.tokens.items()},
            {k: v.to(device=device) for k, v in self.masks.items()},
        )

    @staticmethod
    def cat(parts: list["Condition"]) -> "Condition":
        """The batches of ``parts`` one after another. A source whose token counts differ is padded
        at the end, which needs its padding masks (padding without one would read as tokens)."""
        tokens, masks = {}, {}
        for name in parts[0].tokens:
            ts = [p.tokens[name] for p in parts]
            n = max(t.shape[1] for t in ts)
            if any(t.shape[1] != n for t in ts) and not all(name in p.masks for p in parts):
                raise ValueError(f"condition '{name}': the batches have {sorted({t.shape[1] for t in ts})} tokens and no "
                                 "padding mask, so they cannot be joined")
            tokens[name] = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[1])) for t in ts])
            if any(name in p.masks for p in parts):
                ms = [p.mask(name) for p in parts]
                masks[name] = torch.cat([torch.nn.functional.pad(m, (0, n - m.shape[1])) for m in ms])
        return Condition(tokens, masks)

    def select(self, index) -> "Condition":
        """Rows ``index`` (an int, slice or index tensor) of every source."""
        idx = [index] if isinstance(index, int) else index
        return Condition({k: v[idx] for k, v in self.tokens.items()}, {k: v[idx] for k, v in self.masks.items()})


def standard_condition_spec(
    text_width: int,
    text_tokens: int,
    latent_channels: int,
    image_resolution: int,
    patch: int = 2,
    vae_scale: int = 8,
    text_layer: int | str = "last",
    text_mask: bool = False,
) -> ConditionSpec:
    """The condition every supported family uses: the instruction through the base's own text
    encoder (hidden layer ``text_layer``, final norm applied, optionally with a padding mask),
    plus the source image through the base's VAE (latent in the model's scaled space, as the
    denoiser sees it), cut into ``patch`` x ``patch`` tokens."""
    side = image_resolution // vae_scale // patch
    if side < 1 or image_resolution % (vae_scale * patch):
        raise ValueError(f"image_resolution {image_resolution} must be a multiple of vae_scale*patch = {vae_scale * patch}")
    text_options = {"layer": "last" if text_layer in ("last", -1) else text_layer, "final_norm": True}
    if text_mask:
        text_options["mask"] = "padding"
    return ConditionSpec((
        ConditionSource("text", "text_hidden_states", text_width, text_tokens, text_options),
        ConditionSource(
            "image", "vae_latent_patches", latent_channels * patch * patch, side * side,
            {"resolution": image_resolution, "patch": patch, "vae_scale": vae_scale, "latent": "scaled"},
        ),
    ))


def square_resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, C, resolution, resolution): shorter side to ``resolution``
    (bilinear, antialiased), then a centre crop. Trainer and nodes both call this."""
    h, w = images.shape[-2:]
    s = resolution / min(h, w)
    nh, nw = max(resolution, round(h * s)), max(resolution, round(w * s))
    out = torch.nn.functional.interpolate(images.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return out[..., top : top + resolution, left : left + resolution]


def patchify_latent(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/p)*(w/p), C*p*p), row-major over patches."""
    b, c, h, w = latent.shape
    if h % patch or w % patch:
        raise ValueError(f"latent of {h}x{w} does not divide into {patch}x{patch} patches")
    x = latent.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def prompt_mask(ids: torch.Tensor, end_token: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) bool: True up to and including the first ``end_token`` (the
    prompt's own tokens), False for the padding after it. A row without an end token is all True.
    Trainer and nodes both call this, so the generator sees the same mask in both."""
    is_end = ids == end_token
    first_end = torch.where(is_end.any(1), is_end.float().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
    return torch.arange(ids.shape[1], device=ids.device)[None] <= first_end[:, None]
