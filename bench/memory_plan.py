"""GPU memory plan per base family and generator preset, computed (not guessed) from the
full-size architectures on the meta device: nothing is allocated, nothing is downloaded.

    python bench/memory_plan.py                     # JSON for every family x preset
    python bench/memory_plan.py --markdown          # the README table
    python bench/memory_plan.py --families sd15_ip2p --presets small --gpus 8

For each family, the resolution, batch and rank of its shipped config (trainer/configs/<family>.yaml):
  * frozen base: the networks resident during training steps, at their stored size (bf16, or fp8 linear
    weights with base.weight_dtype): the denoiser (without the blocks train.blocks_to_swap keeps in CPU
    memory, but with two of them in flight), plus the text encoders and the VAE unless
    train.offload_encoders parks them in CPU memory once the rows are encoded (the default); a validation
    grid brings them back, so the one-GPU figure is the larger of the training peak and the whole base +
    the generator's state;
  * generator: fp32 weights + fp32 gradients + AdamW's two fp32 moments (16 bytes a parameter);
  * activations: the bytes autograd saves for backward in one training forward (generator ->
    per-sample LoRA -> base -> loss, run on meta tensors with the trainer's own family adapter
    and LoRA hooks, bf16 as under autocast), counted with saved-tensor hooks (each storage
    once, weights excluded); with activation checkpointing (generator blocks and the base's
    own checkpointing) the saved set outside the checkpointed blocks, their inputs, plus the
    largest single block recomputed during backward;
  * FSDP over N GPUs (trainer/sharding.py): the generator's state / N plus one gathered block
    (bf16 weights + fp32 gradients); with the base sharded, its weights / N plus two gathered
    blocks (the one computing and the one prefetched).
Not counted: CUDA context (~0.5-1 GB), allocator fragmentation and caching, cuBLAS/attention
workspaces, transient tensors of the backward pass. Treat the totals as lower bounds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 2**30
# shipped configs (trainer/configs/<name>.yaml), one per base; klein has one per size
FAMILIES = ("sd15_ip2p", "flux_kontext", "flux_kontext_24gb", "qwen_image_edit", "qwen_image_edit_24gb", "qwen_image_edit_plus",
            "qwen_image_edit_plus_24gb", "flux2_klein_4b",
            "flux2_klein_9b")
PRESETS = ("small", "medium", "large")


class SavedBytes:
    """Bytes autograd keeps for backward (each storage once; parameters excluded)."""

    def __init__(self, skip_ids: set[int]):
        self.skip, self.seen, self.bytes, self.block_peak = skip_ids, set(), 0, 0

    def add(self, t) -> None:
        import torch

        if not torch.is_tensor(t):
            return
        base = t._base if t._base is not None else t
        if id(base) in self.skip or id(base) in self.seen:
            return
        self.seen.add(id(base))
        self.bytes += base.numel() * base.element_size()

    def hooks(self):
        import torch

        def pack(t):
            self.add(t)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def checkpoint_fn(self):
        """Stands in for torch.utils.checkpoint.checkpoint: counts the block's inputs (kept for the
        recompute) here and what the block itself saves as a candidate for the recompute peak."""
        outer = self

        def fn(block, *args, **kwargs):
            kwargs.pop("use_reentrant", None)
            for a in args:
                outer.add(a)
            inner = SavedBytes(outer.skip)
            with inner.hooks():
                out = block(*args, **kwargs)
            outer.block_peak = max(outer.block_peak, inner.bytes)
            return out

        return fn


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bytes(module) -> int:
    """Stored bytes of a module's parameters and buffers (bf16, or 1 byte for fp8 weights)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def family_config(family: str):
    """A shipped config by name (trainer/configs/<name>.yaml), or any config file by its path."""
    from trainer.config import load_config

    cfg = load_config(family if family.endswith(".yaml") else str(REPO / "trainer" / "configs" / f"{family}.yaml"))
    cfg.base.synthetic_full, cfg.base.path = True, ""
    cfg.data.cache_mb = 0
    return cfg


def activations(adapter, cfg, preset: str, checkpointing: bool) -> dict:
    """Saved bytes of one training forward (batch x draws samples) on meta tensors."""
    import torch

    import hywu_nodes.core.generator as core_generator
    from hywu_nodes.core import GeneratedLoRA, build_target_spec, lora_patched
    from trainer.methods import build_method

    meta = torch.device("meta")
    b, k, r = cfg.train.batch_size, cfg.train.draws_per_example, cfg.base.resolution
    spec = build_target_spec(adapter.denoiser, cfg.base.family, include=cfg.base.targets)
    cfg.generator.preset, cfg.generator.gradient_checkpointing = preset, checkpointing
    with torch.device("meta"):
        gen = build_method(cfg, spec, adapter.condition_spec, []).module.to(device=meta, dtype=torch.bfloat16)
    lat_c, side = adapter.latent_channels, r // adapter.condition_spec["image"].options.get("vae_scale", 8)
    text = _meta_text(adapter, b)
    enc = {"source": torch.empty(b, lat_c, side, side, device=meta, dtype=torch.bfloat16),
           "target": torch.empty(b, lat_c, side, side, device=meta, dtype=torch.bfloat16), "text": text}
    # The empty prompt for CFG dropout (encode_text's form), without running an encoder on meta.
    empty = _meta_text(adapter, 1)
    adapter._empty = empty[0] if adapter.name == "sd15_ip2p" else empty
    prep = adapter.prepare_encoded(enc, 0, list(range(b * k)))
    skip = {id(p) for p in list(adapter.denoiser.parameters()) + list(gen.parameters())}
    counter = SavedBytes(skip)
    real_ckpt = core_generator.checkpoint
    if checkpointing:
        core_generator.checkpoint = counter.checkpoint_fn()
        adapter.denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=counter.checkpoint_fn())
    try:
        with counter.hooks():
            out = gen.tokens(prep["condition"].to(meta, torch.bfloat16))
            gen_bytes = counter.bytes
            lora = GeneratedLoRA(gen.tokenizer.detokenize(out), gen.scale)
            with lora_patched(adapter.denoiser, lora):
                adapter.loss(prep).mean()
    finally:
        core_generator.checkpoint = real_ckpt
        if checkpointing:
            adapter.denoiser.disable_gradient_checkpointing()
    return {"generator_bytes": gen_bytes, "base_bytes": counter.bytes - gen_bytes, "recompute_peak_bytes": counter.block_peak,
            "total_bytes": counter.bytes + counter.block_peak, "samples": b * k}


def _meta_text(adapter, b: int):
    """What training_text returns for b instructions, as meta tensors of the configured length."""
    import torch

    meta, bf = torch.device("meta"), torch.bfloat16
    name = adapter.name
    width = adapter.condition_spec["text"].width
    n = adapter.text_tokens
    if name == "sd15_ip2p":  # (UNet context, prompt mask)
        return torch.empty(b, n, width, device=meta, dtype=bf), torch.ones(b, n, dtype=torch.bool, device=meta)
    if name == "flux2_klein":  # the taps of all 512 tokens, no mask
        return torch.empty(b, n, width, device=meta, dtype=bf)
    if name == "flux_kontext":
        return (torch.empty(b, n, width, device=meta, dtype=bf),
                torch.empty(b, adapter.clip.config.hidden_size, device=meta, dtype=bf))
    if name.startswith("qwen_image_edit"):  # stack_text's form: the VL sees the image, the reference at its own size
        from trainer.families.qwen_image_edit import VL_MERGE, VL_PATCH

        vl = round(adapter.vl_pixels ** 0.5 / (VL_PATCH * VL_MERGE)) ** 2  # image tokens Qwen2.5-VL adds to the text
        side = round(adapter.reference_pixels ** 0.5) // 8
        hidden, mask = torch.empty(b, vl + n, width, device=meta, dtype=bf), torch.ones(b, vl + n, dtype=torch.bool, device=meta)
        return (hidden, mask, torch.zeros(b, dtype=torch.long, device=meta), hidden, mask,
                torch.empty(b, adapter.latent_channels, side, side, device=meta, dtype=bf))
    return torch.empty(b, n, width, device=meta, dtype=bf), torch.ones(b, n, dtype=torch.bool, device=meta)


def plan(family: str, presets, gpus: int, plain: bool = True) -> dict:
    """The plan of config ``family`` for ``presets``; ``plain`` False skips the activations without
    checkpointing (the slow count; its figures are then reported as None)."""
    import torch

    from hywu_nodes.core import GeneratorConfig, HYWUGenerator, build_target_spec
    from trainer.families import load_family
    from trainer.sharding import shard_units

    cfg = family_config(family)
    adapter = load_family(cfg, torch.device("meta"), torch.bfloat16)
    frozen = adapter.frozen_modules()
    parts = {name: _numel(m) for name, m in frozen.items()}
    stored = {name: _bytes(m) for name, m in frozen.items()}
    base_all = sum(stored.values())
    denoiser = next(stored[k] for k, m in frozen.items() if m is adapter.denoiser)
    units = shard_units(adapter.denoiser)
    swapped = [_bytes(u) for u in units[len(units) - cfg.train.blocks_to_swap:]] if cfg.train.blocks_to_swap else []
    # train.blocks_to_swap: the swapped blocks wait in CPU memory, two at a time on the GPU (one computing, one arriving)
    denoiser_resident = denoiser - sum(swapped) + 2 * max(swapped, default=0) if swapped else denoiser
    base_resident = denoiser_resident + (0 if cfg.train.offload_encoders else base_all - denoiser)  # during steps
    base_unit = max(_numel(u) for u in shard_units(adapter.denoiser))
    out = {"family": family, "resolution": cfg.base.resolution, "batch_per_gpu": cfg.train.batch_size,
           "draws_per_example": cfg.train.draws_per_example, "rank": cfg.generator.rank, "text_tokens": cfg.base.text_tokens,
           "weight_dtype": cfg.base.weight_dtype, "offload_encoders": cfg.train.offload_encoders,
           "blocks_to_swap": cfg.train.blocks_to_swap, "swapped_gib": sum(swapped) / GIB,
           "parameters": parts, "stored_bytes": stored, "base_resident_gib": base_resident / GIB, "base_all_gib": base_all / GIB,
           "largest_base_block_parameters": base_unit, "presets": {}}
    for preset in presets:
        act = {ck: activations(adapter, family_config(family), preset, ck) for ck in ((False, True) if plain else (True,))}
        act.setdefault(False, {"total_bytes": float("nan")})
        spec = build_target_spec(adapter.denoiser, cfg.base.family, include=cfg.base.targets)
        gcfg = GeneratorConfig.from_preset(preset, rank=cfg.generator.rank, alpha=cfg.generator.alpha)
        with torch.device("meta"):
            gen = HYWUGenerator(gcfg, spec, adapter.condition_spec)
        p = _numel(gen)
        unit = max([_numel(u) for u in shard_units(gen)] or [p])
        state = 16 * p
        validation = base_all - denoiser + denoiser_resident + state  # the encoders back for a grid; no training activations
        one = {ck: max(base_resident + state + act[ck]["total_bytes"], validation) for ck in (False, True)}
        fsdp_gen = base_resident + state / gpus + 6 * unit + act[True]["total_bytes"]
        fsdp_both = base_resident - denoiser + denoiser / gpus + 2 * 2 * base_unit + state / gpus + 6 * unit + act[True]["total_bytes"]
        out["presets"][preset] = {
            "generator_parameters": p, "parameter_tokens": gen.tokenizer.n_tokens, "targets": len(spec.targets),
            "generator_state_gib": state / GIB,
            "activations_gib": act[False]["total_bytes"] / GIB, "activations_checkpointed_gib": act[True]["total_bytes"] / GIB,
            "activations_detail": {("checkpointed" if ck else "plain"): {k: v / GIB if k.endswith("bytes") else v
                                                                         for k, v in a.items()} for ck, a in act.items()},
            "one_gpu_gib": one[False] / GIB, "one_gpu_checkpointed_gib": one[True] / GIB,
            f"fsdp_{gpus}_gpus_generator_sharded_gib": fsdp_gen / GIB,
            f"fsdp_{gpus}_gpus_generator_and_base_sharded_gib": fsdp_both / GIB,
        }
    return out


def markdown(plans: list[dict], gpus: int) -> str:
    rows = ["| config (res, batch/GPU) | preset | frozen base resident | generator params | generator fp32+AdamW | activations / with ckpt "
            f"| 1 GPU / with ckpt | FSDP {gpus} GPUs: generator sharded | + base sharded |",
            "|---|---|---|---|---|---|---|---|---|"]
    for pl in plans:
        for preset, v in pl["presets"].items():
            rows.append(
                f"| {pl['family']} ({pl['resolution']} px, {pl['batch_per_gpu']}) | {preset} | {pl['base_resident_gib']:.1f} GiB "
                f"| {v['generator_parameters'] / 1e6:,.0f} M | {v['generator_state_gib']:.1f} GiB "
                f"| {v['activations_gib']:.1f} / {v['activations_checkpointed_gib']:.1f} GiB "
                f"| {v['one_gpu_gib']:.1f} / {v['one_gpu_checkpointed_gib']:.1f} GiB "
                f"| {v[f'fsdp_{gpus}_gpus_generator_sharded_gib']:.1f} GiB | {v[f'fsdp_{gpus}_gpus_generator_and_base_sharded_gib']:.1f} GiB |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--gpus", type=int, default=8, help="processes of the FSDP columns")
    p.add_argument("--markdown", action="store_true", help="print the README table instead of JSON")
    a = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    plans = [plan(f, a.presets.split(","), a.gpus) for f in a.families.split(",")]
    print(markdown(plans, a.gpus) if a.markdown else json.dumps(plans, indent=1))


if __name__ == "__main__":
    main()
