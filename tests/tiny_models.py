"""Tiny seeded diffusers denoisers for core tests (in memory, milliseconds per forward)."""
import torch

from hywu_nodes.core import Condition, ConditionSource, ConditionSpec, GeneratorConfig, HYWUGenerator, build_target_spec


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def unet_inputs(batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 8, 8, 8, generator=g),
        timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
    )


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()


def flux_inputs(batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, 4, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(5, 3),
    )


def tiny_qwen(seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()


# A generator for the tiny bases, with a condition of two sources (padded text + image tokens).
COND_SPEC = ConditionSpec((
    ConditionSource("text", "text_hidden_states", 32, 12),
    ConditionSource("image", "vae_latent_patches", 16, 16),
))


def make_condition(batch, seed=0, text_len=12):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[:, text_len - 3 :] = False  # padded text tokens
    return Condition({"text": torch.randn(batch, text_len, 32, generator=g), "image": torch.randn(batch, 16, 16, generator=g)}, {"text": mask})


def make_generator(model, family, seed=0, nonzero_b=False, **cfg):
    torch.manual_seed(seed)
    gen = HYWUGenerator(GeneratorConfig.from_preset("tiny", rank=4, alpha=8, **cfg), build_target_spec(model, family), COND_SPEC)
    if nonzero_b:  # a "trained" generator: B head away from its zero init
        torch.nn.init.normal_(gen.head_b.weight, std=0.05)
    return gen


def generator_loss_and_grad(adapter, include=None, device="cpu") -> tuple[float, torch.Tensor]:
    """One HY-WU training forward + backward on a family adapter: a tiny generator (seed 0, a random B head so the
    LoRA acts and every generator part gets a gradient) on 4 synthetic examples. Returns (loss, the generator's
    flattened gradient). Backward runs inside the LoRA patch, as in the trainer (checkpointing recomputes with it)."""
    from hywu_nodes.core import lora_patched
    from trainer.data import pil_to_tensor
    from trainer.synthetic import make_examples

    ex = make_examples("train", 4, resolution=32)
    batch = {"source": torch.stack([pil_to_tensor(e.source) for e in ex]),
             "target": torch.stack([pil_to_tensor(e.target) for e in ex]), "instruction": [e.instruction for e in ex]}
    torch.manual_seed(0)
    gen = HYWUGenerator(GeneratorConfig.from_preset("tiny", rank=4, alpha=4.0),
                        build_target_spec(adapter.denoiser, adapter.name, include=include), adapter.condition_spec).to(device)
    with torch.no_grad():
        gen.head_b.weight.normal_(0, 0.02)
    prep = adapter.prepare(batch, 0, list(range(4)))
    with lora_patched(adapter.denoiser, gen(prep["condition"])):
        loss = adapter.loss(prep).mean()
        loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten() for p in gen.parameters() if p.grad is not None])
