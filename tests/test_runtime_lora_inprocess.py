"""Runtime LoRAs in-process on ComfyUI's own objects (the micro SD1.5-IP2P checkpoint, no server):
the model call ``apply_model`` with runtime LoRAs equals ComfyUI's weight patches for every LoRA
form a standard LORA_MODEL carries (linear, 3x3 LoCon and 1x1 convolutions, Flux-style fused
qkv slices, core Train LoRA's key layout), other adapter types fall back to weight patches,
per-sample mapping over cond/uncond chunks, and the multi-line Condition Encode."""
from __future__ import annotations

import pytest
import torch

import comfy_harness

R = 4


@pytest.fixture(scope="module")
def comfy_model(micro_base):
    comfy_harness.import_comfy(micro_base.comfyui, extra_modules=(
        "comfy.sd", "comfy.utils", "comfy.model_management", "folder_paths", "comfy.lora", "comfy_api.latest"))
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(micro_base.checkpoint), output_vae=True,
                                                                output_clip=True)
    return model, clip, vae


def _lora(module_key, down_shape, up_shape, seed, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    return {f"{module_key}.lora_down.weight": torch.randn(down_shape, generator=g) * 0.1,
            f"{module_key}.lora_up.weight": torch.randn(up_shape, generator=g) * 0.1,
            f"{module_key}.alpha": torch.tensor(alpha)}


def _standard_lora(seed=0) -> dict:
    """A kohya-layout SD1.5 LoRA with a linear layer, a 3x3 LoCon convolution and a 1x1
    convolution given 2D weights (proj_in of SD1.5 is a 1x1 conv)."""
    sd = {}
    sd.update(_lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (R, 320), (320, R), seed))
    sd.update(_lora("lora_unet_conv_in", (R, 8, 3, 3), (320, R, 1, 1), seed + 1))
    sd.update(_lora("lora_unet_down_blocks_0_attentions_0_proj_in", (R, 320), (320, R), seed + 2))
    return sd


def _inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    return dict(x=x, t=torch.full((batch,), 5.0), c_concat=torch.randn(batch, 4, 8, 8, generator=g),
                c_crossattn=torch.randn(batch, 77, 768, generator=g))


def _call(patcher, inp, chunks=None):
    """One model call as the sampler makes it: the clone loaded (object and weight patches
    applied), its wrappers and the chunk layout in transformer_options."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    opts = {"wrappers": patcher.wrappers}
    if chunks is not None:
        opts["cond_or_uncond"] = chunks
    with torch.no_grad():
        return patcher.model.apply_model(inp["x"], inp["t"], c_concat=inp["c_concat"], c_crossattn=inp["c_crossattn"],
                                         transformer_options=opts)


def _apply(model, lora, strength, mode, batch_index=-1):
    from hywu_nodes.nodes.apply import HYWUApplyGeneratedLoRA

    return HYWUApplyGeneratedLoRA.execute(model, lora, strength, batch_index, mode).args[0]


def _close(a, b, ref):
    diff, effect = float((a - b).abs().max()), float((b - ref).abs().max())
    assert effect > 1e-2, "the LoRA does not change the output; the comparison would prove nothing"
    assert diff <= 1e-4 * effect + 1e-5, (diff, effect)


def test_standard_lora_runtime_equals_weight_patch(comfy_model):
    from hywu_nodes.nodes.apply import apply_runtime_lora

    model = comfy_model[0]
    lora = _standard_lora()
    inp = _inputs(2)
    runtime, stats = apply_runtime_lora(model, lora, [lora], 0.7)
    assert stats["runtime_layers"] == 3 and stats["weight_patched"] == 0
    _close(_call(runtime, inp), _call(_apply(model, lora, 0.7, "patch"), inp), _call(model, inp))


def test_core_train_lora_key_layout_runs_at_runtime(comfy_model):
    """Core Train LoRA writes '<model key>.lora_up.weight' (diffusion_model.<layer>)."""
    model = comfy_model[0]
    lora = _lora("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v", (R, 768), (320, R), 5)
    inp = _inputs(2)
    _close(_call(_apply(model, lora, 1.0, "runtime"), inp), _call(_apply(model, lora, 1.0, "patch"), inp),
           _call(model, inp))


def test_other_adapters_are_patched_into_the_weights(comfy_model):
    from hywu_nodes.nodes.apply import apply_runtime_lora
    from hywu_nodes.nodes.types import HYWUError

    model = comfy_model[0]
    lora = _lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (R, 320), (320, R), 1)
    lora["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.diff"] = torch.randn(320, 320) * 0.01
    inp = _inputs(2)
    runtime, stats = apply_runtime_lora(model, lora, [lora], 1.0)
    assert stats["runtime_layers"] == 1 and stats["weight_patched"] == 1
    _close(_call(runtime, inp), _call(_apply(model, lora, 1.0, "patch"), inp), _call(model, inp))
    with pytest.raises(HYWUError, match="cannot run per sample"):
        apply_runtime_lora(model, lora, [lora, lora], 1.0)


def test_each_sample_uses_its_lora_across_cond_uncond_chunks(comfy_model):
    """Two LoRAs, a latent batch of 4 (each edit twice), cond + uncond chunks: sample j of
    each chunk equals a one-LoRA patched model on that sample."""
    from hywu_nodes.nodes.apply import HYWUApplyGeneratedLoRA
    from hywu_nodes.nodes.types import HYWUError, HYWULoRA

    model = comfy_model[0]
    loras = [_standard_lora(seed) for seed in (10, 20)]
    batched = HYWULoRA(loras[0], batch=loras)
    runtime = HYWUApplyGeneratedLoRA.execute(model, batched, 1.0, -1, "runtime").args[0]
    inp = _inputs(8)  # 2 chunks x 4 latents
    out = _call(runtime, inp, chunks=[0, 1])
    base = _call(model, inp, chunks=[0, 1])
    for j in range(2):
        single = _call(_apply(model, loras[j], 1.0, "patch"), inp)
        for i in (j, j + 2, j + 4, j + 6):  # latents j and j+2 of both chunks use LoRA j
            _close(out[i], single[i], base[i])
    with pytest.raises(HYWUError, match="3 latent"):
        _call(runtime, _inputs(6), chunks=[0, 1])  # 3 latents, 2 LoRAs


def test_input_model_keeps_its_patches_wrappers_and_outputs(comfy_model):
    model = comfy_model[0]
    state = (dict(model.object_patches), {k: dict(v) for k, v in model.wrappers.items()}, dict(model.patches))
    inp = _inputs(2)
    before = _call(model, inp)
    runtime = _apply(model, _standard_lora(), 1.0, "runtime")
    assert runtime is not model and len(runtime.object_patches) == 3 and runtime.wrappers
    _call(runtime, inp)
    assert (dict(model.object_patches), {k: dict(v) for k, v in model.wrappers.items()}, dict(model.patches)) == state
    assert torch.equal(_call(model, inp), before)


def test_fused_qkv_slices_match_comfy_weight_patches():
    """Flux-style key maps send to_q/to_k/to_v LoRAs to slices of one fused qkv weight
    ((key, (0, offset, size))): the runtime term must land in the same output rows."""
    import comfy.lora
    from comfy.weight_adapter.lora import LoRAAdapter

    from hywu_nodes.nodes.runtime_lora import RuntimeLoRA, split_patches

    h = 16
    model = torch.nn.Module()
    model.attn = torch.nn.Module()
    model.attn.qkv = torch.nn.Linear(h, 3 * h)
    g = torch.Generator().manual_seed(0)
    patches = {}
    for i in range(3):
        up, down = torch.randn(h, 2, generator=g), torch.randn(2, h, generator=g)
        patches[("attn.qkv.weight", (0, i * h, h))] = LoRAAdapter(set(), (up, down, 4.0, None, None, None))
    layers, weight_patches = split_patches(model, [patches], 0.5)
    assert list(layers) == ["attn.qkv"] and not weight_patches
    x = torch.randn(3, 5, h, generator=g)
    runtime = RuntimeLoRA(layers, 1)
    with torch.no_grad():
        got = runtime.add_delta("attn.qkv", model.attn.qkv, x, model.attn.qkv(x))
    w = model.attn.qkv.weight.detach().clone()
    for key, adapter in patches.items():
        w = comfy.lora.calculate_weight([(0.5, adapter, 1.0, key[1], None)], w, key[0])
    want = torch.nn.functional.linear(x, w, model.attn.qkv.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_condition_encode_one_edit_per_line(comfy_model, micro_base):
    """N lines = N edits: the batch rows equal N one-line encodes; the image is repeated per edit."""
    import sys
    from pathlib import Path

    from hywu_nodes.nodes.encode import HYWUConditionEncode, _batch_text, pair_images
    from hywu_nodes.nodes.load_generator import load_generator_handle
    from hywu_nodes.nodes.types import HYWUError

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import build_test_generator as btg
    finally:
        sys.path.pop(0)
    gen = load_generator_handle(str(btg.build_test_generators(base_dir=micro_base.diffusers_dir)["seeded"]))
    _, clip, vae = comfy_model
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    lines = ["make it snowy", "", "  make it night  "]
    enc, cond, images = HYWUConditionEncode.execute(image, "\n".join(lines), clip, True, generator=gen, vae=vae).args
    assert enc.batch_size == 2 and images.shape[0] == 2 and cond[0][0].shape[0] == 2
    assert cond[0][1]["pooled_output"].shape[0] == 2
    for i, line in enumerate(["make it snowy", "make it night"]):
        one, one_cond, _ = HYWUConditionEncode.execute(image, line, clip, False, generator=gen, vae=vae).args
        assert torch.equal(cond[0][0][i], one_cond[0][0][0])
        for name, t in enc.condition.tokens.items():  # the VAE encodes a batch of 2 (fp rounding)
            torch.testing.assert_close(t[i], one.condition.tokens[name][0], rtol=1e-5, atol=1e-5, msg=name)
    # the same text without one_edit_per_line is one instruction
    whole, _, _ = HYWUConditionEncode.execute(image, "\n".join(lines), clip, False, generator=gen, vae=vae).args
    assert whole.batch_size == 1
    with pytest.raises(HYWUError, match="3 instructions .* for 2 images"):
        pair_images(torch.rand(2, 8, 8, 3), 3)
    a, b = torch.randn(1, 77, 8), torch.randn(1, 154, 8)
    both = _batch_text([a, b], "text")  # ComfyUI's own rule: repeat to the common length
    assert both.shape == (2, 154, 8) and torch.equal(both[0, 77:], a[0])
    with pytest.raises(HYWUError, match="different lengths"):
        _batch_text([torch.randn(1, 13, 8), torch.randn(1, 17, 8)], "text")
