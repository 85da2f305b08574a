"""Which linear layers of a base model the generator writes LoRAs for.

A :class:`TargetSpec` lists the adapted ``nn.Linear`` modules (diffusers module names, their
input and output widths) and groups them by transformer block. It is plain data: it
serialises to JSON and has a stable fingerprint, so a generator file can say exactly which
layers of which base it was trained for.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

from torch import nn

# Attention projections and feed-forward linears of each supported base family, matched
# against diffusers module names.
DEFAULT_PATTERNS: dict[str, tuple[str, ...]] = {
    "sd15_ip2p": (
        r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
        r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$",
    ),
    "flux_kontext": (
        r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
        r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)$",
        r"single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)$",
    ),
    "qwen_image_edit": (
        r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
        r"transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)$",
    ),
    # Qwen-Image-Edit-2509 / 2511: the same 20B MMDiT as Qwen-Image-Edit
    "qwen_image_edit_plus": (
        r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
        r"transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)$",
    ),
    # FLUX.2 [klein] 4B / 9B: Flux2Transformer2DModel (SwiGLU feed-forwards, fused single-block projections)
    "flux2_klein": (
        r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
        r"transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out)$",
        r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)$",
    ),
}
BASE_FAMILIES = tuple(DEFAULT_PATTERNS)

_BLOCK = re.compile(r"^(.*?(?:single_transformer_blocks|transformer_blocks)\.\d+)\.")


@dataclass(frozen=True)
class LinearTarget:
    name: str  # diffusers module name, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    d_in: int
    d_out: int
    group: int  # index of the transformer block the layer belongs to


@dataclass(frozen=True)
class TargetSpec:
    family: str
    targets: tuple[LinearTarget, ...]

    def __post_init__(self):
        if not self.targets:
            raise ValueError(f"target spec for '{self.family}' selects no linear layers")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    @property
    def n_groups(self) -> int:
        return max(t.group for t in self.targets) + 1

    def lora_elements(self, rank: int) -> int:
        """Number of LoRA entries (A and B) one generated LoRA has."""
        return sum(rank * (t.d_in + t.d_out) for t in self.targets)

    def to_dict(self) -> dict:
        return {"family": self.family, "targets": [asdict(t) for t in self.targets]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "TargetSpec":
        return cls(family=data["family"], targets=tuple(LinearTarget(**t) for t in data["targets"]))

    @classmethod
    def from_json(cls, text: str) -> "TargetSpec":
        return cls.from_dict(json.loads(text))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def build_target_spec(
    model: nn.Module,
    family: str,
    include: tuple[str, ...] | list[str] | None = None,
    exclude: tuple[str, ...] | list[str] = (),
) -> TargetSpec:
    """List the ``nn.Linear`` layers of ``model`` matching ``include`` and not ``exclude``.

    Patterns are regular expressions searched in the module name; ``include`` defaults to
    the family's attention and feed-forward projections. Module order is the model's own.
    """
    if include is None:
        if family not in DEFAULT_PATTERNS:
            raise ValueError(f"unknown base family '{family}'; known: {', '.join(BASE_FAMILIES)}")
        include = DEFAULT_PATTERNS[family]
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    groups: dict[str, int] = {}
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not any(p.search(name) for p in inc) or any(p.search(name) for p in exc):
            continue
        match = _BLOCK.match(name)
        block = match.group(1) if match else name.rsplit(".", 1)[0]
        group = groups.setdefault(block, len(groups))
        targets.append(LinearTarget(name, module.in_features, module.out_features, group))
    return TargetSpec(family=family, targets=tuple(targets))
