"""ComfyUI nodes of HY-WU (imports ``comfy``; loaded by the pack's root ``__init__``).

Thin adapters from ComfyUI objects to :mod:`hywu_nodes.core`. Nothing the trainer needs lives
here, and ``hywu_nodes.core`` never imports this package.
"""
from .extension import NODES, HYWUExtension, comfy_entrypoint

__all__ = ["NODES", "HYWUExtension", "comfy_entrypoint"]
