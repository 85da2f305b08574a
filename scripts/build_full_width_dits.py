#!/usr/bin/env python
"""Build the seeded full-width one-block FLUX.1 Kontext and Qwen-Image diffusion-model files (no downloads).

ComfyUI's model detection fixes the widths of FLUX (24 heads, axes [16, 56, 56], so hidden 3072),
Qwen-Image (3072 wide, text 3584) and FLUX.2 (128-wide heads), so the core UNETLoader refuses the trainer's
tiny bases. The smallest
files it detects and loads keep those widths and shrink only the depth:

* ``models/diffusion_models/hywu_fullwidth_flux_kontext.safetensors``: FLUX.1 [dev] / Kontext layout
  (guidance_embed, 16 latent channels, T5 context 4096, CLIP-L pooled 768), 1 double + 1 single block,
  545.5M params, 1.09 GB bf16;
* ``models/diffusion_models/hywu_fullwidth_qwen_image.safetensors``: Qwen-Image(-Edit) layout, 1 layer,
  380M params, 0.76 GB bf16;
* ``models/diffusion_models/hywu_fullwidth_flux2_klein.safetensors``: FLUX.2 [klein] 4B layout (128 latent
  channels, Qwen3-4B context 7680, no guidance embedding, shared modulations), 1 double + 1 single block,
  563.1M params, 1.13 GB bf16.

Tensor names and shapes come from ComfyUI's own model classes built on the meta device (the single-file
layout UNETLoader reads). Values are seeded: matrices ``randn / sqrt(fan_in)`` (one generator per tensor,
seeded from the file seed and the tensor name, so a tensor does not depend on the others), biases 0, norm
scales 1; each tensor is drawn in row chunks and cast to bf16 at once, so the build never holds an fp32
copy of the model. The file's metadata records the config and seed; a file whose record matches is kept.

CLI::

    python scripts/build_full_width_dits.py [--kind flux_kontext|qwen_image|flux2_klein|all] [--seed 0]
        [--out models/diffusion_models] [--comfyui PATH] [--force]
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "models" / "diffusion_models"
FORMAT = "hywu-full-width-dit/2"  # bump when the fill rule or layout changes: cached files are then rebuilt

# ComfyUI unet_config of each file (what comfy.model_detection reads back from the tensors).
CONFIGS = {
    "flux_kontext": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                         hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1,
                         axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True, patch_size=2),
    "qwen_image": dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=3584, patch_size=2),
    # FLUX.2 [klein] 4B's widths (Qwen3-4B text 3 x 2560, 128 latent channels), 1 double + 1 single block
    "flux2_klein": dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=7680,
                        hidden_size=3072, mlp_ratio=3.0, num_heads=24, depth=1, depth_single_blocks=1,
                        axes_dim=[32, 32, 32, 32], theta=2000, qkv_bias=False, guidance_embed=False, patch_size=1,
                        global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                        ref_index_scale=10.0, txt_ids_dims=[3]),
}
# The matching diffusers transformer configs (for target specs: tests/test_full_width_loaders.py).
DIFFUSERS_CONFIGS = {
    "flux_kontext": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "qwen_image": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
    "flux2_klein": dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                        rope_theta=2000, guidance_embeds=False),
}
KINDS = tuple(CONFIGS)


def file_path(kind: str, out_dir=DEFAULT_OUT) -> Path:
    return Path(out_dir) / f"hywu_fullwidth_{kind}.safetensors"


def record(kind: str, seed: int) -> dict:
    """What the file's metadata must say for a cached file to be reused."""
    return {"format": FORMAT, "kind": kind, "seed": seed, "dtype": "bf16", "unet_config": CONFIGS[kind]}


def _meta_network(kind: str, comfyui_path=None):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_micro_base as bmb
    finally:
        sys.path.remove(str(REPO / "scripts"))
    bmb._import_comfy(bmb.find_comfyui(comfyui_path))
    import comfy.ops

    ops = comfy.ops.disable_weight_init  # no init work: shapes only
    cfg = dict(CONFIGS[kind])
    if kind in ("flux_kontext", "flux2_klein"):
        import dataclasses

        import comfy.ldm.flux.model as flux

        image_model = cfg.pop("image_model")
        fields = {f.name for f in dataclasses.fields(flux.FluxParams)}
        if kind == "flux_kontext" and "txt_ids_dims" in fields:
            cfg["txt_ids_dims"] = []  # newer ComfyUI (0.28+): its detection sets [] for FLUX.1
        cfg = {k: v for k, v in cfg.items() if k in fields}  # an older ComfyUI's FLUX.2 has fewer options
        return flux.Flux(**cfg, image_model=image_model, dtype=torch.bfloat16, device="meta", operations=ops)
    import comfy.ldm.qwen_image.model as qwen

    return qwen.QwenImageTransformer2DModel(
        patch_size=cfg["patch_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        num_layers=cfg["num_layers"], attention_head_dim=cfg["attention_head_dim"],
        num_attention_heads=cfg["num_attention_heads"], joint_attention_dim=cfg["joint_attention_dim"],
        dtype=torch.bfloat16, device="meta", operations=ops)


def seeded_tensor(name: str, shape, seed: int, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """bf16 tensor ``name`` of the file: biases 0, 1-D (norm scales) 1, else randn / sqrt(fan_in),
    drawn in row chunks (fp32 only one chunk at a time)."""
    shape = tuple(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(shape[0], -1)
    fan_in = flat.shape[1]
    rows = max(1, chunk_elems // fan_in)
    for i in range(0, shape[0], rows):
        block = torch.randn((min(rows, shape[0] - i), fan_in), generator=g)
        flat[i:i + rows] = block.mul_(fan_in ** -0.5)
    return out


def released_key(kind: str, name: str) -> str:
    """The key the released file has: FLUX's q/k RMSNorm scales are `.scale` there (ComfyUI 0.3.75's
    module names), where ComfyUI 0.28+ names the parameter `.weight` (and still loads `.scale`)."""
    if kind in ("flux_kontext", "flux2_klein") and name.endswith(("query_norm.weight", "key_norm.weight")):
        return name[: -len("weight")] + "scale"
    return name


def cached_ok(path: Path, kind: str, seed: int) -> bool:
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a truncated or foreign file: rebuild it
        return False
    return meta.get("hywu_full_width") == json.dumps(record(kind, seed), sort_keys=True)


def build(kind: str, path: Path, seed: int = 0, comfyui_path=None) -> dict:
    """Write ``path`` (via a temporary file). Returns {params, bytes, seconds}."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    net = _meta_network(kind, comfyui_path)
    sd = {released_key(kind, name): seeded_tensor(name, p.shape, seed) for name, p in net.state_dict().items()}
    del net
    params = sum(t.numel() for t in sd.values())
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"hywu_full_width": json.dumps(record(kind, seed), sort_keys=True)})
    tmp.replace(path)
    return {"params": params, "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}


def ensure_full_width_dits(kinds=KINDS, out_dir=DEFAULT_OUT, seed: int = 0, comfyui_path=None, force=False) -> dict:
    """Build what is missing or stale (or everything with force). Returns {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    # Several test sessions may start at once: one builds, the others wait and reuse.
    with open(out_dir / ".hywu_fullwidth.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for kind in kinds:
            path = file_path(kind, out_dir)
            if force or not cached_ok(path, kind, seed):
                info = build(kind, path, seed, comfyui_path)
                print(f"built {path.name}: {info['params'] / 1e6:.1f}M params, {info['bytes'] / 1e9:.2f} GB, "
                      f"{info['seconds']:.1f} s", flush=True)
            paths[kind] = path
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=(*KINDS, "all"), default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (ComfyUI's models/diffusion_models)")
    ap.add_argument("--comfyui", default=None, help="ComfyUI path (default: $COMFYUI_PATH, else .cache/comfyui-newest, else .cache/comfyui)")
    ap.add_argument("--force", action="store_true", help="rebuild even when a matching file exists")
    a = ap.parse_args(argv)
    t0 = time.time()
    kinds = KINDS if a.kind == "all" else (a.kind,)
    for kind, p in ensure_full_width_dits(kinds, a.out, a.seed, a.comfyui, a.force).items():
        print(f"{kind}: {p}")
    print(f"({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
