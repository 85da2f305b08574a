"""HY-WU for ComfyUI.

``hywu_nodes.core`` is pure torch (no ComfyUI, no diffusers) and is shared by the trainer and
the ComfyUI nodes. ``hywu_nodes.nodes`` adapts ComfyUI objects to the core and is imported
only by the pack's root ``__init__`` when ComfyUI loads it.
"""
