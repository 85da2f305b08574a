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
    assert pl["base_bf16_gib"] * 2**30 == 2 * sum(pl["parameters"].values())
    assert v["generator_state_gib"] * 2**30 == 16 * v["generator_parameters"]
    assert 0 < v["activations_checkpointed_gib"] < v["activations_gib"]
    assert v["fsdp_8_gpus_generator_and_base_sharded_gib"] < v["fsdp_8_gpus_generator_sharded_gib"] < v["one_gpu_checkpointed_gib"]
    assert v["targets"] == 160 and v["activations_detail"]["plain"]["samples"] == 8
