"""Condition parity, Qwen-Image-Edit and -Edit-Plus (2509/2511), in real ComfyUI classes (in-process): the trainer's
features (transformers Qwen2.5-VL, diffusers VAE) against ComfyUI's own tokenizer files, text encoder classes
(tests/comfy_test_nodes/tiny_qwen_te.py), Wan 2.1 VAE and latent format, and against Condition Encode.

Tolerances (fp32 on CPU, the seeded tiny base of trainer/tiny_bases.py): token ids, VL patches and resizes
exactly equal; hidden states and latents max |diff| <= 1e-5 (measured about 1e-6); the text RoPE of a reference
larger than the output: the trainer's ComfyUI convention <= 1e-5, diffusers' own start differs (measured ~1e-3).
"""
from __future__ import annotations

import math

import pytest
import torch

import comfy_harness
from mixed_aspect import as_comfy, comfy_scaled, condition_encode_image, max_rel, picture, trainer_row

FLOOR = pytest.mark.floor  # also on ComfyUI 0.3.75, the requires-comfyui floor (Makefile): every test but one bucket case

FAMILIES = ("qwen_image_edit", "qwen_image_edit_plus")
INSTRUCTIONS = ["make it red", "replace the sky with a sunset"]
TOL = 1e-5


@pytest.fixture(scope="module")
def comfy():
    comfy_harness.import_comfy(extra_modules=("comfy.sd", "comfy.utils", "comfy.latent_formats", "comfy.model_management",
                                              "comfy.text_encoders.qwen_image", "comfy.text_encoders.qwen_vl",
                                              "comfy.supported_models_base", "comfy.ldm.wan.vae", "comfy_api.latest"))
    from comfy_test_nodes import tiny_qwen_te

    return tiny_qwen_te


@pytest.fixture(scope="module", params=FAMILIES)
def parts(request, comfy, tmp_path_factory):
    from trainer.families import load_family
    from trainer.tiny_bases import tiny_config

    torch.set_num_threads(2)
    cfg = tiny_config(request.param, tmp_path_factory.mktemp("out"), base={"vl_pixels": 112 * 84})
    adapter = load_family(cfg, torch.device("cpu"), torch.float32)
    return adapter, comfy.tiny_qwen_clip(cfg.base.path), comfy.tiny_qwen_vae(cfg.base.path), cfg


def _image(h=40, w=56, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _vl_input(adapter, image):
    """What the family's core node gives Qwen2.5-VL: its area resize (TextEncodeQwenImageEdit(Plus))."""
    import comfy.utils

    samples = image.movedim(-1, 1)
    s = math.sqrt(adapter.vl_pixels / (samples.shape[3] * samples.shape[2]))
    return comfy.utils.common_upscale(samples, round(samples.shape[3] * s), round(samples.shape[2] * s), "area", "disabled").movedim(1, -1)


def _comfy_tokens(clip, adapter, instruction, vl):
    from hywu_nodes.core.qwen_prompts import QWEN_EDIT_PLUS_TEMPLATE as QWEN_PLUS_TEMPLATE, QWEN_PICTURE

    if adapter.name == "qwen_image_edit_plus":  # what TextEncodeQwenImageEditPlus passes
        return clip.tokenize(QWEN_PICTURE.format(1) + instruction, images=[vl], llama_template=QWEN_PLUS_TEMPLATE)
    return clip.tokenize(instruction, images=[vl])  # what TextEncodeQwenImageEdit passes


@FLOOR
@torch.no_grad()
def test_tokens_patches_and_hidden_states(parts):
    """Token ids (chat template, image placeholder) and the template drop; VL resize and patches; the hidden states of
    ComfyUI's Qwen2.5-VL classes (with the image spliced in, M-RoPE, the system prefix dropped) against transformers'."""
    from comfy.text_encoders.qwen_vl import process_qwen2vl_images

    from trainer.families.qwen_image_edit import VL_MERGE, vl_patches

    adapter, clip, _, _ = parts
    image = _image()
    vl = _vl_input(adapter, image)
    ours_vl = adapter.vl_image(image.movedim(-1, 1))
    assert torch.equal(ours_vl.movedim(1, -1), vl)
    pixels, grid = process_qwen2vl_images(vl)
    ours_pixels, ours_grid = vl_patches(ours_vl[0])
    assert torch.equal(ours_grid, grid) and torch.equal(ours_pixels, pixels)
    for instruction in INSTRUCTIONS:
        tokens = _comfy_tokens(clip, adapter, instruction, vl)
        row = [t[0] for t in tokens["qwen25_7b"][0]]
        ids, end = adapter.token_ids(instruction, int(grid.prod()) // VL_MERGE ** 2)
        k = ids.index(adapter.ids["image"])
        assert [t if isinstance(t, int) else "image" for t in row] == ids[:k] + ["image"] + [t for t in ids[k:] if t != adapter.ids["image"]]
        assert end == 64  # the system prefix diffusers drops (prompt_template_encode_start_idx) is ComfyUI's drop too
        theirs = clip.encode_from_tokens(tokens)[0]
        ours, start = adapter.vl_hidden(instruction, ours_vl[0])
        assert theirs.shape == ours.shape
        print(f"{adapter.name} '{instruction}': {theirs.shape[0]} tokens after the drop, hidden states max abs diff "
              f"{float((theirs - ours).abs().max()):.1e} (max |x| {float(ours.abs().max()):.2f})")
        assert (theirs - ours).abs().max() <= TOL * ours.abs().max(), (theirs - ours).abs().max()
        assert ids[end + start - 1] == adapter.ids["vision_end"]  # the generator's part starts right after the image


@FLOOR
@torch.no_grad()
@pytest.mark.parametrize("parts", ["qwen_image_edit"], indirect=True)  # the vision tower is the same for both families
def test_comfy_0375_vision_token_order(comfy, parts):
    """ComfyUI 0.3.75 returns Qwen2.5-VL's merged vision tokens in window-attention order; transformers (and newer
    ComfyUI) in raster order. The test TE node and the trainer use raster order; 0.3.75's order is exactly a
    permutation of it (so with 0.3.75 a Qwen-Image-Edit base sees the image's tokens shuffled)."""
    from comfy.text_encoders.qwen_vl import process_qwen2vl_images

    adapter, clip, _, cfg = parts
    old = comfy.tiny_qwen_clip(cfg.base.path, raster_order=False).cond_stage_model.qwen25_7b.transformer.visual
    new = clip.cond_stage_model.qwen25_7b.transformer.visual
    pixels, grid = process_qwen2vl_images(_image(224, 168))  # 8 x 6 merged tokens: 4 windows
    a, b = old(pixels, grid), new(pixels, grid)
    window, _ = old.get_window_index(grid)
    print(f"ComfyUI 0.3.75 vision tokens vs raster order: max abs diff {float((a - b).abs().max()):.1e}, "
          f"after its window permutation {float((a - b[window]).abs().max()):.1e}")
    assert (a - b[window]).abs().max() <= TOL
    assert (a - b).abs().max() > 1e-3


@FLOOR
@torch.no_grad()
def test_vae_latent_patches(parts):
    """The image condition: ComfyUI's Wan 2.1 VAE (loaded from the diffusers weights) + Qwen-Image's latent_format
    (Wan21.process_in) against the trainer's latent; decode the other way."""
    import comfy.latent_formats as lf

    from hywu_nodes.core import patchify_latent

    adapter, _, vae, _ = parts
    image = _image(32, 48, seed=1)
    theirs = lf.Wan21().process_in(vae.encode(image).float())[:, :, 0]
    ours = adapter.latent(image.movedim(-1, 1))
    print(f"{adapter.name}: VAE latent patches max abs diff {float((theirs - ours).abs().max()):.1e}")
    assert (patchify_latent(theirs, 2) - patchify_latent(ours, 2)).abs().max() <= TOL * ours.abs().max()
    back = vae.decode(lf.Wan21().process_out(ours[:, :, None]))[:, 0]
    assert (back - ((adapter.decode_latent(ours) + 1) / 2).clamp(0, 1).movedim(1, -1)).abs().max() <= 1e-4


@FLOOR
@torch.no_grad()
def test_condition_encode_parity(parts, tmp_path):
    """HY-WU Condition Encode's features for a generator file of this family equal the trainer's encode_condition:
    the image-aware text (after the image, per edit, padded + masked) and the VAE patches."""
    import comfy.latent_formats as lf

    from hywu_nodes.core import GeneratorConfig, HYWUGenerator, build_target_spec, save_generator
    from hywu_nodes.nodes.encode import build_condition, generator_texts
    from hywu_nodes.nodes.load_generator import load_generator_handle

    adapter, clip, vae, _ = parts
    spec = build_target_spec(adapter.denoiser, adapter.name, include=[r"attn\.to_q$"])
    path = tmp_path / "g.safetensors"
    save_generator(path, HYWUGenerator(GeneratorConfig.from_preset("tiny", rank=4, alpha=4.0), spec, adapter.condition_spec))
    handle = load_generator_handle(str(path))  # the options pass the file checks and come back unchanged
    assert handle.condition_spec == adapter.condition_spec
    images = torch.cat([_image(32, 32, seed=2), _image(32, 32, seed=3)])
    theirs = build_condition(handle.condition_spec, images, lambda s: generator_texts(clip, INSTRUCTIONS, s, None, images),
                             vae=vae, latent_format=lf.Wan21(), family=adapter.name)
    ours = adapter.encode_condition(images.movedim(-1, 1), INSTRUCTIONS)
    assert torch.equal(theirs.masks["text"], ours.masks["text"])
    for k in ("text", "image"):
        print(f"{adapter.name} Condition Encode {k}: {tuple(ours.tokens[k].shape)}, max abs diff "
              f"{float((theirs.tokens[k] - ours.tokens[k]).abs().max()):.1e}")
        assert theirs.tokens[k].shape == ours.tokens[k].shape
        assert (theirs.tokens[k] - ours.tokens[k]).abs().max() <= TOL * ours.tokens[k].abs().max(), k


@FLOOR
@torch.no_grad()
@pytest.mark.parametrize("parts", ["qwen_image_edit"], indirect=True)  # the same DiT for both families
def test_text_rope_reference_larger_than_output(parts):
    """A reference latent larger than the output: ComfyUI starts the text RoPE after the output latent. The trainer does
    the same (diffusers starts after the largest image); measured against ComfyUI's Qwen-Image model."""
    import comfy.model_management as mm
    from comfy_test_nodes.tiny_dit import tiny_dit_patcher
    from pathlib import Path

    from diffusers import QwenImageTransformer2DModel

    from hywu_nodes.core import patchify_latent
    from trainer.families.base import unpatchify_latent

    adapter, _, _, cfg = parts
    patcher = tiny_dit_patcher(Path(cfg.base.path) / "transformer")
    mm.load_models_gpu([patcher])
    g = torch.Generator().manual_seed(4)
    c, h, w, rh, rw = adapter.latent_channels, 8, 8, 16, 12
    x, ref = torch.randn(1, c, h, w, generator=g), torch.randn(1, c, rh, rw, generator=g)
    ctx = torch.randn(1, 7, 32, generator=g)
    theirs = patcher.model.diffusion_model(x[:, :, None], torch.tensor([0.6]), ctx, ref_latents=[ref[:, :, None]])[:, :, 0]
    args = (patchify_latent(x, 2), patchify_latent(ref, 2), torch.tensor([0.6]), (ctx, torch.ones(1, 7, dtype=torch.bool)), h, w, rh, rw)
    ours = unpatchify_latent(adapter._forward(*args), c, h, w)
    plain = QwenImageTransformer2DModel.from_pretrained(Path(cfg.base.path) / "transformer").eval()  # diffusers' own RoPE
    adapter.transformer, kept = plain, adapter.transformer
    try:
        diffusers_start = unpatchify_latent(adapter._forward(*args), c, h, w)
    finally:
        adapter.transformer = kept
    print(f"reference {rh}x{rw} > output {h}x{w} latent: trainer vs ComfyUI max abs diff {float((ours - theirs).abs().max()):.1e}, "
          f"diffusers' own text RoPE start vs ComfyUI {float((diffusers_start - theirs).abs().max()):.1e}")
    assert (ours - theirs).abs().max() <= TOL * theirs.abs().max()
    assert (diffusers_start - theirs).abs().max() > 1e-4  # the convention matters at this size


@torch.no_grad()
@pytest.mark.parametrize("size", [pytest.param((150, 100), id="3:2"),  # 0.30 only: the test-time budget
                                  pytest.param((90, 160), id="9:16", marks=FLOOR)])
def test_template_bucket_parity(parts, size, tmp_path):
    """base.buckets template (0.01 MP) on a non-square source: the image is ImageScaleToTotalPixels' (lanczos,
    bit-equal); the sampler's latent (VAE Encode of it) and the reference latent (the family's TextEncodeQwenImageEdit
    node: its 1 MP area resize and VAE encode, at ComfyUI's own sizes) are ComfyUI's in the Wan 2.1 latent format;
    the generator's image condition is Condition Encode's on the scaled image."""
    import comfy.latent_formats as lf

    adapter, clip, vae, _ = parts
    nodes = comfy_harness.load_comfy_nodes()
    pil = picture(*size, seed=1)
    scaled = comfy_scaled(adapter.name, as_comfy(pil), megapixels=0.01)
    plus = adapter.name == "qwen_image_edit_plus"
    node = nodes["TextEncodeQwenImageEditPlus" if plus else "TextEncodeQwenImageEdit"]
    conditioning = node.execute(clip, "make it brighter", vae=vae, **{"image1" if plus else "image": scaled})[0]
    ref_theirs = lf.Wan21().process_in(conditioning[0][1]["reference_latents"][0])[:, :, 0]
    out_theirs = lf.Wan21().process_in(vae.encode(scaled))[:, :, 0]
    kept = adapter.vl_pixels, adapter.reference_pixels
    adapter.vl_pixels, adapter.reference_pixels = adapter.VL_PIXELS, adapter.REFERENCE_PIXELS  # the node's sizes
    try:
        batch, enc = trainer_row(adapter, pil, megapixels=0.01)
    finally:
        adapter.vl_pixels, adapter.reference_pixels = kept
    assert torch.equal(batch["source"], scaled.movedim(-1, 1))
    ref_ours = enc["text"][5]
    cond = condition_encode_image(adapter, scaled, clip, vae, lf.Wan21(), tmp_path)
    errs = (max_rel(enc["target"], out_theirs), max_rel(ref_ours, ref_theirs), max_rel(adapter.encoded_condition(enc).tokens["image"], cond))
    print(f"{adapter.name} {size[0]}x{size[1]} -> {scaled.shape[2]}x{scaled.shape[1]}: latent {tuple(out_theirs.shape[-2:])} rel "
          f"{errs[0]:.1e}, reference {tuple(ref_theirs.shape[-2:])} rel {errs[1]:.1e}, condition rel {errs[2]:.1e}")
    assert enc["target"].shape == out_theirs.shape and ref_ours.shape == ref_theirs.shape
    assert max(errs) <= TOL


@FLOOR
@torch.no_grad()
def test_odd_latent_sides_are_padded_as_comfyui_pads_them(parts):
    """A bucket whose latent has odd sides (a 125 x 84 image: a 15 x 10 latent): ComfyUI's Qwen-Image model pads
    output and reference circularly to whole 2x2 patches, centres an odd number of patches with the extra one after
    the centre, and crops the output; the trainer's velocity does the same (diffusers alone: ~1e-2 off)."""
    import comfy.model_management as mm
    from comfy_test_nodes.tiny_dit import tiny_dit_patcher
    from pathlib import Path

    from hywu_nodes.core import patchify_latent
    from trainer.families.qwen_image_edit import pad_even

    adapter, _, _, cfg = parts
    patcher = tiny_dit_patcher(Path(cfg.base.path) / "transformer")
    mm.load_models_gpu([patcher])
    g = torch.Generator().manual_seed(5)
    c = adapter.latent_channels
    x, ref = torch.randn(1, c, 15, 10, generator=g), torch.randn(1, c, 13, 9, generator=g)
    ctx = torch.randn(1, 7, 32, generator=g)
    theirs = patcher.model.diffusion_model(x[:, :, None], torch.tensor([0.6]), ctx, ref_latents=[ref[:, :, None]])[:, :, 0]
    ref_p = pad_even(ref)
    ours = adapter._velocity(x, patchify_latent(ref_p, 2), torch.tensor([0.6]), (ctx, torch.ones(1, 7, dtype=torch.bool)),
                             *ref_p.shape[-2:])
    print(f"odd latent 15x10, reference 13x9: trainer vs ComfyUI max abs diff {float((ours - theirs).abs().max()):.1e}")
    assert ours.shape == theirs.shape == x.shape
    assert (ours - theirs).abs().max() <= TOL * theirs.abs().max()


@FLOOR
@pytest.mark.parametrize("parts", ["qwen_image_edit"], indirect=True)
def test_condition_encode_refuses_a_clip_without_images(parts):
    """A Qwen-Image-Edit generator with a CLIP that does not tokenize images (e.g. SD1.5's): a clear error, not features
    the generator was never trained on."""
    from hywu_nodes.nodes.encode import generator_texts
    from hywu_nodes.nodes.types import HYWUError

    class TextOnlyClip:  # what CLIP.tokenize gives for encoders without image support: ids only, images ignored
        def tokenize(self, text, **kwargs):
            return {"l": [[(49406, 1.0), (320, 1.0), (49407, 1.0)]]}

    adapter = parts[0]
    with pytest.raises(HYWUError, match="qwen_image CLIP"):
        generator_texts(TextOnlyClip(), ["make it red"], adapter.condition_spec["text"], None, _image())
