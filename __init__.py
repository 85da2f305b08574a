"""ComfyUI entry point of the HY-WU node pack (ComfyUI imports this folder as a package).

The nodes import ``comfy``, so they are imported when ComfyUI calls the entry point, not when
this package is imported (plain Python, pytest and the trainer never need ComfyUI).
"""


async def comfy_entrypoint():
    from .hywu_nodes.nodes.extension import comfy_entrypoint as entrypoint

    return await entrypoint()


__all__ = ["comfy_entrypoint"]
