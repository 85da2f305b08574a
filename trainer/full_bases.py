"""Full-size base networks built from the configs shipped in ``trainer/architectures/`` (no
weights, nothing fetched).

* ``device="meta"``: shapes only, no memory (sizes, the memory plan);
* any real device: **seeded random weights** (each module's own default init under
  ``torch.manual_seed(seed)``), for step-time, memory and sharding measurements. Such a base
  edits nothing; ``base.synthetic_full: true`` makes the trainer use one in place of a folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ARCH_DIR = Path(__file__).resolve().parent / "architectures"

# Component -> the library that owns its class (diffusers models vs transformers encoders).
_TRANSFORMERS_CONFIGS = {
    "CLIPTextModel": "CLIPTextConfig",
    "T5EncoderModel": "T5Config",
    "Qwen2_5_VLModel": "Qwen2_5_VLConfig",
    "Qwen3Model": "Qwen3Config",
}


def architecture(family: str, component: str) -> dict:
    """The shipped config of ``component`` (``unet``, ``text_encoder``, ...) of ``family``."""
    path = ARCH_DIR / family / f"{component}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (ARCH_DIR / family).glob("*.json")) if (ARCH_DIR / family).is_dir() else []
        raise ValueError(f"no shipped architecture for {family}/{component}; known: {', '.join(known) or 'none'} "
                         f"(families: {', '.join(sorted(p.name for p in ARCH_DIR.iterdir() if p.is_dir()))})")
    return json.loads(path.read_text())


def components(family: str) -> list[str]:
    """Network components of ``family`` (the scheduler is a config, not a network)."""
    return sorted(p.stem for p in (ARCH_DIR / family).glob("*.json") if p.stem != "scheduler")


def build_component(family: str, component: str, device="meta", dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> torch.nn.Module:
    """The full-size network ``component`` of ``family``: on ``meta`` (sizes only) or with seeded
    random weights on a real device, in eval mode with gradients off."""
    cfg = architecture(family, component)
    name = cfg["_class_name"]
    default = torch.get_default_dtype()
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            torch.set_default_dtype(dtype)  # weights are created in their final dtype (no fp32 copy of a 12B model)
            if name in _TRANSFORMERS_CONFIGS:
                import transformers

                config = getattr(transformers, _TRANSFORMERS_CONFIGS[name])(**{k: v for k, v in cfg.items() if k != "_class_name"})
                model = getattr(transformers, name)(config)
            else:
                import diffusers

                model = getattr(diffusers, name).from_config(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False).eval()


def scheduler_config(family: str) -> dict:
    return architecture(family, "scheduler")


def parameter_counts(family: str) -> dict[str, int]:
    """Parameters of every network component of ``family``, counted on the meta device."""
    return {c: sum(p.numel() for p in build_component(family, c).parameters()) for c in components(family)}
