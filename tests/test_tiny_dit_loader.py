"""The test-only tiny DiT loader (tests/comfy_test_nodes/tiny_dit.py) builds the trainer's tiny FLUX and
Qwen-Image transformers with ComfyUI's own classes: ComfyUI's forward equals diffusers' on the same
weights, and ComfyUI's LoRA key map covers every target name the trainer adapts.

Tolerance: max |diff| <= 1e-4 (fp32 on CPU; the prototype measured <= 2e-6)."""
from __future__ import annotations

import pytest
import torch

import comfy_harness

FAMILIES = ("flux_kontext", "qwen_image_edit")


@pytest.fixture(scope="module")
def comfy_mods():
    comfy_harness.import_comfy(extra_modules=("comfy.sd", "comfy.utils", "comfy.model_management", "comfy.lora"))
    from comfy_test_nodes import tiny_dit

    return tiny_dit


def _tiny_transformer(family):
    from trainer.tiny_bases import CACHE, build_tiny_base

    folder = build_tiny_base(family, CACHE / family) / "transformer"
    if family == "flux_kontext":
        from diffusers import FluxTransformer2DModel as cls
    else:
        from diffusers import QwenImageTransformer2DModel as cls
    return folder, cls.from_pretrained(folder).eval()


def _pack(lat):
    from hywu_nodes.core import patchify_latent

    return patchify_latent(lat, 2)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_comfy_forward_equals_diffusers(comfy_mods, family):
    import comfy.model_management as mm

    folder, dmodel = _tiny_transformer(family)
    patcher = comfy_mods.tiny_dit_patcher(folder)
    mm.load_models_gpu([patcher])
    net = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    c = dmodel.config.in_channels // 4 if family == "flux_kontext" else dmodel.config.out_channels
    h = w = 8
    x, ref = torch.randn(1, c, h, w, generator=g), torch.randn(1, c, h, w, generator=g)
    ctx = torch.randn(1, 5, dmodel.config.joint_attention_dim, generator=g)
    sigma = 0.6
    n = (h // 2) * (w // 2)
    if family == "flux_kontext":
        pooled = torch.randn(1, dmodel.config.pooled_projection_dim, generator=g)
        ours = net(x, torch.tensor([sigma]), ctx, y=pooled, guidance=torch.tensor([2.5]), ref_latents=[ref])
        ids = torch.zeros(2, h // 2, w // 2, 3)
        ids[1, ..., 0] = 1
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        theirs = dmodel(hidden_states=torch.cat([_pack(x), _pack(ref)], 1), encoder_hidden_states=ctx, pooled_projections=pooled,
                        timestep=torch.tensor([sigma]), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3),
                        guidance=torch.tensor([2.5])).sample[:, :n]
    else:
        ours = net(x[:, :, None], torch.tensor([sigma]), ctx, ref_latents=[ref[:, :, None]])[:, :, 0]
        theirs = dmodel(hidden_states=torch.cat([_pack(x), _pack(ref)], 1), encoder_hidden_states=ctx,
                        encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.bool), timestep=torch.tensor([sigma]),
                        img_shapes=[[(1, h // 2, w // 2), (1, h // 2, w // 2)]]).sample[:, :n]
    assert _pack(ours).shape == theirs.shape
    diff = (_pack(ours) - theirs).abs().max().item()
    assert diff <= 1e-4, f"{family}: ComfyUI and diffusers differ by {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_key_map_covers_every_target(comfy_mods, family):
    import comfy.lora

    from hywu_nodes.core import build_target_spec

    folder, dmodel = _tiny_transformer(family)
    patcher = comfy_mods.tiny_dit_patcher(folder)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    names = build_target_spec(dmodel, family).names
    missing = [n for n in names if f"transformer.{n}" not in key_map]
    assert names and not missing, f"{family}: {len(missing)} of {len(names)} targets have no ComfyUI key: {missing[:5]}"
