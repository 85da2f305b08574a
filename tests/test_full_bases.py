"""Full-size architectures from the shipped configs (no weights, nothing fetched): their sizes
match the published models, ``base.synthetic_full`` trains in place of a base folder, and the
memory plan computed from them is consistent."""
import sys
from pathlib import Path

import pytest

from trainer.full_bases import build_component, parameter_counts

REPO = Path(__file__).resolve().parent.parent

# Published sizes (parameters): SD1.5 UNet 859.52 M + the IP2P input layer, CLIP-L text 123.06 M,
# SD VAE 83.65 M, FLUX.1 transformer 11.90 B, Qwen-Image transformer 20.43 B, Qwen3-4B 4.02 B (tied embeddings),
# Qwen3-8B 8.19 B with its LM head (151936 x 4096, which FLUX.2 [klein] 9B does not load).
PUBLISHED = {("sd15_ip2p", "unet"): 859.53e6, ("sd15_ip2p", "text_encoder"): 123.06e6, ("sd15_ip2p", "vae"): 83.65e6,
             ("flux_kontext", "transformer"): 11.90e9, ("qwen_image_edit", "transformer"): 20.43e9,
             ("flux2_klein", "text_encoder"): 4.02e9, ("flux2_klein_9b", "text_encoder"): 8.19e9 - 151936 * 4096}


@pytest.mark.parametrize("family,component", sorted(PUBLISHED))
def test_sizes_match_published_models(family, component):
    model = build_component(family, component)  # meta device: no memory
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PUBLISHED[family, component]) / PUBLISHED[family, component] < 0.001, n
    assert all(p.device.type == "meta" for p in model.parameters())


def test_sd15_counts_and_unknown_component():
    counts = parameter_counts("sd15_ip2p")
    assert set(counts) == {"unet", "text_encoder", "vae"}
    with pytest.raises(ValueError, match="known: scheduler, text_encoder, unet, vae"):
        build_component("sd15_ip2p", "transformer")


def test_synthetic_full_base_trains(tmp_path):
    """One step of the trainer on the full-size SD1.5 UNet with seeded random weights (64 px, two
    layers adapted to stay fast on a CPU)."""
    from trainer.tiny_bases import tiny_config
    from trainer.train import run

    cfg = tiny_config("sd15_ip2p", tmp_path, data={"n_train": 2, "n_val": 0},
                      base={"synthetic_full": True, "path": "", "resolution": 64,
                            "targets": [r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.(to_q|to_v)$"]},
                      train={"max_steps": 1, "batch_size": 1, "device": "cpu"})
    s = run(cfg, check_frozen=True, progress=False)
    assert s["steps"] == 1 and s["sizes"]["targets"] == 2 and all(s["frozen_unchanged"].values())
    assert s["final_loss"] == s["final_loss"]


def test_memory_plan_is_consistent():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import memory_plan
    finally:
        sys.path.pop(0)
    [pl] = [memory_plan.plan("sd15_ip2p", ["small"], gpus=8)]
    v = pl["presets"]["small"]
    # bf16, the encoders parked during steps (train.offload_encoders): the UNet resident, the whole base at validation
    assert pl["base_all_gib"] * 2**30 == sum(pl["stored_bytes"].values())  # parameters and buffers
    assert abs(pl["base_all_gib"] * 2**30 / (2 * sum(pl["parameters"].values())) - 1) < 1e-3
    assert pl["base_resident_gib"] * 2**30 == pl["stored_bytes"]["unet"] and pl["offload_encoders"]
    assert v["generator_state_gib"] * 2**30 == 16 * v["generator_parameters"]
    assert 0 < v["activations_checkpointed_gib"] < v["activations_gib"]
    assert v["fsdp_8_gpus_generator_and_base_sharded_gib"] < v["fsdp_8_gpus_generator_sharded_gib"] < v["one_gpu_checkpointed_gib"]
    assert v["targets"] == 160 and v["activations_detail"]["plain"]["samples"] == 8


def test_memory_plan_models_fp8_parked_encoders_and_block_swap(tmp_path):
    """The plan reads base.weight_dtype, train.offload_encoders and train.blocks_to_swap from the config: fp8
    stores the denoiser's linear weights in one byte, without parking the encoders stay resident, swapped
    blocks leave the GPU but for two."""
    import yaml

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import memory_plan
    finally:
        sys.path.pop(0)
    plans = {}
    for name, base, train in (("bf16", {}, {"offload_encoders": False}), ("parked", {}, {}),
                              ("fp8", {"weight_dtype": "fp8_e4m3fn"}, {}), ("swap", {}, {"blocks_to_swap": 4})):
        cfg = yaml.safe_load((REPO / "trainer" / "configs" / "flux2_klein_4b.yaml").read_text())
        cfg["base"].update(base)
        cfg["train"].update(train)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        plans[name] = memory_plan.plan(str(path), ["tiny"], gpus=8)
    stored = plans["bf16"]["stored_bytes"]
    assert plans["bf16"]["base_resident_gib"] * 2**30 == sum(stored.values())
    assert plans["parked"]["base_resident_gib"] * 2**30 == stored["transformer"]
    fp8 = plans["fp8"]["stored_bytes"]["transformer"]
    assert 0.5 * stored["transformer"] < fp8 < 0.52 * stored["transformer"]  # linear weights 1 byte; norms stay bf16
    assert plans["fp8"]["stored_bytes"]["text_encoder"] == stored["text_encoder"]
    # 4 swapped blocks (klein 4B's last single blocks, all one size): they leave, two of them are in flight
    swapped = plans["swap"]["swapped_gib"]
    assert swapped > 0 and abs(plans["swap"]["base_resident_gib"] - (plans["parked"]["base_resident_gib"] - swapped / 2)) < 1e-9


def test_every_family_has_a_24gb_config_planned_under_22_gib():
    """The shipped one-GPU recipes (docs/training.md): each family's plan at its template's resolution, small preset
    with checkpointing, at most 22 GiB (24 GiB cards keep 0.5-1 GiB for the CUDA context)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import memory_plan
    finally:
        sys.path.pop(0)
    recipes = {"sd15_ip2p": "sd15_ip2p", "flux_kontext": "flux_kontext_24gb", "qwen_image_edit": "qwen_image_edit_24gb",
               "qwen_image_edit_plus": "qwen_image_edit_plus_24gb", "flux2_klein 4B": "flux2_klein_4b",
               "flux2_klein 9B": "flux2_klein_9b"}
    from trainer.families import FAMILIES

    assert {k.split()[0] for k in recipes} == set(FAMILIES)
    planned = {}
    for family, config in recipes.items():
        pl = memory_plan.plan(config, ["small"], gpus=8, plain=False)
        planned[family] = round(pl["presets"]["small"]["one_gpu_checkpointed_gib"], 2)
    print(planned)
    assert max(planned.values()) <= 22.0, planned