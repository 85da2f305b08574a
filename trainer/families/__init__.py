"""Base family adapters. Adding a family = one module here + one line in ``FAMILIES``."""
from __future__ import annotations

import importlib

from .base import BaseFolderError, FamilyAdapter, check_base_folder, module_digest

FAMILIES = {
    "sd15_ip2p": "trainer.families.sd15_ip2p:SD15IP2P",
    "flux_kontext": "trainer.families.flux_kontext:FluxKontext",
    "qwen_image_edit": "trainer.families.qwen_image_edit:QwenImageEdit",
    "qwen_image_edit_plus": "trainer.families.qwen_image_edit_plus:QwenImageEditPlus",
    "flux2_klein": "trainer.families.flux2_klein:Flux2Klein",
}


def _family_module(cfg):
    if cfg.base.family not in FAMILIES:
        raise ValueError(f"unknown base family '{cfg.base.family}'; known: {', '.join(FAMILIES)}")
    module, cls = FAMILIES[cfg.base.family].split(":")
    return importlib.import_module(module), cls


def check_base(cfg) -> None:
    """Fail fast (before any model import) when the base folder is missing or incomplete."""
    module, _ = _family_module(cfg)
    if cfg.base.synthetic_full:
        return  # built from the shipped architecture configs, no folder
    check_base_folder(cfg.base.path, cfg.base.family, module.REQUIRED, cfg.base.files)


def load_family(cfg, device, dtype) -> FamilyAdapter:
    """Load the frozen base named by ``cfg.base`` (family + local folder); the denoiser stored as ``base.weight_dtype``
    and ``train.blocks_to_swap`` say (trainer/families/base.py BaseParts.model)."""
    module, cls = _family_module(cfg)
    return getattr(module, cls)(cfg, device, dtype)


__all__ = ["FAMILIES", "BaseFolderError", "check_base", "FamilyAdapter", "load_family", "module_digest"]
