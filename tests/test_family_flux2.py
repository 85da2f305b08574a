"""FLUX.2 [klein], trained here and run there: parity of every part the base and the generator see, and the
shipped template end to end, on the newest ComfyUI (0.3.75 has no klein text encoder: not in the floor set).

Base: the trainer's tiny klein base in its ComfyUI variant (trainer/tiny_bases.py: Qwen3 with ComfyUI's shipped
Qwen tokenizer, the FLUX.2 VAE layout with seeded batch-norm statistics, a Flux2 DiT). ComfyUI side: its own
classes through the test-only nodes of tests/comfy_test_nodes/tiny_flux2.py (Flux2TEModel / KleinTokenizer as
CLIPLoader type flux2 builds them, the Flux2 VAE, the DiT from BFL keys through ComfyUI's detection); everything
else is the shipped template example_workflows/api/hywu_edit_flux2_klein.json.

Parity (in-process, fp32 CPU): token ids of ComfyUI's KleinTokenizer = the trainer's, for instructions and the
empty negative (512 each); the text condition (taps 9, 18, 27) within 1e-5 relative; VAEEncode's latent (its
crop to multiples of 16, 2x2 patches, batch norm) and VAEDecode = the trainer's; ComfyUI's Flux2 forward with a
reference latent = the trainer's (position ids, time index 10); Flux2Scheduler = the trainer's sigmas; HY-WU
Condition Encode = the trainer's condition; ComfyUI's key map covers every default target.

End to end (real server, POST /prompt): a generator trained by `python -m trainer.train` (20 steps, cached under
models/e2e/) in the template gives the trainer's own edit (Flux2Klein.sample: 4 euler steps of Flux2Scheduler, CFG
5 against the empty instruction with the reference) at PSNR >= 40 dB in runtime and patch mode, for 1 edit and 2
edits in one batch; strength 0 differs from strength 1 by PSNR < 35 dB. Only the loaders are swapped, and
ImageScaleToTotalPixels is bypassed (its smallest setting, 0.01 MP, would make the 32 px source 102 px).
The distilled checkpoint (a second tiny DiT standing in for it: 4 steps, cfg 1, as the distilled template runs)
runs the base-trained generator's LoRA too, and gives the trainer's own edit on it.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import comfy_harness
import family_e2e as E
from hywu_graphs import make_test_image
from mixed_aspect import as_comfy, comfy_scaled, condition_encode_image, max_rel, picture, trainer_row

STEPS, SEED = 4, 0
RTOL = 1e-5
INSTRUCTIONS = ["turn the red circle blue", "make the picture brighter, please", "Add a small green square at the top-left corner."]
TEMPLATE = "hywu_edit_flux2_klein"


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """(train config, in-process trainer adapter, ComfyUI CLIP, ComfyUI VAE) on the ComfyUI-variant tiny base."""
    comfyui = comfy_harness.comfyui_path()
    comfy_harness.load_comfy_nodes(comfyui)
    import comfy.text_encoders.flux

    if not hasattr(comfy.text_encoders.flux, "KleinTokenizer"):
        pytest.skip(f"the ComfyUI at {comfyui} has no FLUX.2 [klein] (make test runs these on ../shared/comfyui/0.30.0)")
    from comfy_test_nodes.tiny_flux2 import tiny_flux2_clip, tiny_flux2_vae
    from trainer.families import load_family
    from trainer.tiny_bases import tiny_config

    cfg = tiny_config("flux2_klein", tmp_path_factory.mktemp("unused"), comfyui=comfyui, fast=False,  # all 14 targets
                      train={"max_steps": 20, "lr": 3e-3}, data={"n_train": 16, "n_val": 2})
    cfg.name = "e2e_flux2_klein"
    adapter = load_family(cfg, torch.device("cpu"), torch.float32)
    return cfg, adapter, tiny_flux2_clip(cfg.base.path), tiny_flux2_vae(cfg.base.path)


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def test_klein_text_parity(klein):
    """KleinTokenizer's ids and Flux2TEModel's taps (what CLIPLoader flux2 + CLIPTextEncode give) = the trainer's."""
    _, adapter, clip, _ = klein
    for text in INSTRUCTIONS + [""]:
        tokens = clip.tokenize(text)
        (key,) = tokens
        ids = [t[0] for t in tokens[key][0]]
        ours, mask = adapter.token_ids([text])
        assert ids == ours[0].tolist() and len(ids) == 512
        out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        seq = adapter.encode_text([text])
        err = _max_rel(out["cond"], seq)
        print(f"'{text[:24]}': {int(mask.sum())} prompt tokens, taps 9/18/27 max abs "
              f"{float((out['cond'] - seq).abs().max()):.1e} (rel {err:.1e})")
        assert out["cond"].shape == seq.shape == (1, 512, 96) and err <= RTOL
        assert out["pooled_output"] is None  # klein has no pooled text
    assert len(adapter.text_encoder.layers) == 28  # the tiny Qwen3 has 30; layers past the last tap are dropped


@torch.no_grad()
def test_klein_vae_parity(klein):
    """VAEEncode (crop to multiples of 16, encode, 2x2 patches, batch norm) and VAEDecode = the trainer's."""
    _, adapter, _, vae = klein
    img = torch.from_numpy(np.asarray(make_test_image(4, size=88), dtype=np.float32) / 255.0)[None, :72]  # 72 x 88
    theirs = vae.encode(img)
    cropped = img[:, 4:68, 4:84]  # VAEEncode centre-crops to 64 x 80
    ours = adapter.latent(cropped.movedim(-1, 1))
    err = _max_rel(theirs, ours)
    decoded = vae.decode(theirs)
    ours_decoded = ((adapter.decode_latent(ours) + 1) / 2).clamp(0, 1).movedim(1, -1)
    print(f"FLUX.2 VAE: latent max abs {float((theirs - ours).abs().max()):.1e} (rel {err:.1e}), decode max abs "
          f"{float((decoded - ours_decoded).abs().max()):.1e}")
    assert theirs.shape == ours.shape == (1, 128, 4, 5) and err <= RTOL
    assert float((decoded - ours_decoded).abs().max()) <= 1e-4
    import comfy.latent_formats

    from hywu_nodes.nodes.common import latent_format_for_family

    fmt = latent_format_for_family("flux2_klein")
    assert isinstance(fmt, comfy.latent_formats.Flux2) and torch.equal(fmt.process_in(theirs), theirs)


@torch.no_grad()
def test_klein_transformer_parity_and_key_map(klein):
    """ComfyUI's Flux2 (BFL keys, its detection) with a reference latent of another size = the trainer's forward;
    its LoRA key map covers every target of the family's default spec."""
    import comfy.lora
    from comfy_test_nodes.tiny_flux2 import tiny_flux2_patcher

    from hywu_nodes.core import build_target_spec, lora_module_key, patchify_latent
    from trainer.families.base import unpatchify_latent

    cfg, adapter, _, _ = klein
    patcher = tiny_flux2_patcher(f"{cfg.base.path}/transformer")
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(2, 128, 3, 2, generator=g), torch.randn(2, 128, 2, 4, generator=g)
    text, sigma = torch.randn(2, 512, 96, generator=g), torch.tensor([0.7, 0.3])
    theirs = patcher.model.diffusion_model(x, sigma, text, ref_latents=[ref], transformer_options={})
    ours = unpatchify_latent(adapter._forward(patchify_latent(x, 1), patchify_latent(ref, 1), sigma, text, 3, 2, 2, 4),
                             128, 3, 2, patch=1)
    err = _max_rel(theirs, ours)
    print(f"Flux2 forward with a 2x4 reference: max abs {float((theirs - ours).abs().max()):.1e} (rel {err:.1e})")
    assert err <= RTOL
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    spec = build_target_spec(adapter.denoiser, "flux2_klein")
    assert len(spec.targets) == 14  # 8 attention + 4 feed-forward linears of the double block, 2 of the single one
    assert [t.name for t in spec.targets if lora_module_key("flux2_klein", t.name) not in key_map] == []


def test_klein_schedule_is_flux2scheduler(klein):
    from trainer.families.flux2_klein import flux2_sigmas

    nodes = comfy_harness.load_comfy_nodes()
    for steps in (1, 4, 20):
        for w, h in ((32, 32), (1024, 1024), (832, 1216), (2048, 2048)):
            theirs = nodes["Flux2Scheduler"].execute(steps, w, h)[0]
            assert torch.equal(flux2_sigmas(steps, w, h), theirs), (steps, w, h)


def test_template_scale_keeps_a_source_at_the_trained_size():
    """The template's ImageScaleToTotalPixels (1 MP, nearest-exact) hands a 1024 px square source over unchanged:
    a generator trained at base.resolution 1024 gets the reference the trainer gave the base."""
    nodes = comfy_harness.load_comfy_nodes()
    img = torch.rand(1, 1024, 1024, 3)
    assert torch.equal(nodes["ImageScaleToTotalPixels"].execute(img, "nearest-exact", 1.0, 1)[0], img)


@torch.no_grad()
def test_klein_condition_encode_parity(klein, tmp_path):
    """HY-WU Condition Encode's features (ComfyUI CLIP + Flux2 VAE + Flux2 latent format) = the trainer's condition."""
    import comfy.latent_formats

    from hywu_nodes.core import GeneratorConfig, HYWUGenerator, build_target_spec, save_generator
    from hywu_nodes.nodes.encode import encode_condition
    from hywu_nodes.nodes.load_generator import load_generator_handle
    from trainer.data import pil_to_tensor

    _, adapter, clip, vae = klein
    torch.manual_seed(0)
    spec = build_target_spec(adapter.denoiser, "flux2_klein", include=[r"attn\.to_q$"])
    path = tmp_path / "parity.safetensors"
    save_generator(path, HYWUGenerator(GeneratorConfig.from_preset("tiny", rank=4, alpha=4.0), spec, adapter.condition_spec))
    handle = load_generator_handle(str(path))
    for i, text in enumerate(INSTRUCTIONS[:2]):
        img = make_test_image(i, size=32)
        ours = adapter.encode_condition(pil_to_tensor(img)[None], [text])
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        theirs, conditioning = encode_condition(handle.condition_spec, image, text, clip, vae=vae,
                                                model_latent_format=comfy.latent_formats.Flux2())
        assert ours.tokens["image"].shape == theirs.tokens["image"].shape == (1, 4, 128)  # 2x2 latent pixels, 128 channels
        assert ours.tokens["text"].shape == theirs.tokens["text"].shape == (1, 512, 96)
        i_err, t_err = _max_rel(theirs.tokens["image"], ours.tokens["image"]), _max_rel(theirs.tokens["text"], ours.tokens["text"])
        print(f"condition {i}: image rel {i_err:.1e}, text rel {t_err:.1e}")
        assert i_err <= RTOL and t_err <= RTOL
        assert torch.equal(conditioning[0][0], theirs.tokens["text"])  # the sampler's positive is the same encode


@torch.no_grad()
@pytest.mark.parametrize("size", [(150, 100), (90, 160)], ids=["3:2", "9:16"])
def test_klein_template_bucket_parity(klein, size, tmp_path):
    """base.buckets template (0.01 MP) on a non-square source: the image the trainer gives the base is
    ImageScaleToTotalPixels' (nearest-exact, bit-equal), its latent (the reference; the sampler's empty latent has
    its size) is ComfyUI's VAE Encode (crop to multiples of 16), and the generator's image condition is Condition
    Encode's on the scaled image. Tolerance 5e-5: the VAE latent of this nearest-exact upscale differs by 0.5-1.6e-5
    relative (depending on the thread count; fp32 rounding in the tiny VAE), where smooth pictures of the same
    sizes measure 3e-7."""
    import comfy.latent_formats

    _, adapter, clip, vae = klein
    pil = picture(*size, seed=1)
    scaled = comfy_scaled("flux2_klein", as_comfy(pil), megapixels=0.01)
    batch, enc = trainer_row(adapter, pil, megapixels=0.01)
    assert torch.equal(batch["source"], scaled.movedim(-1, 1))
    theirs = vae.encode(scaled)
    cond = condition_encode_image(adapter, scaled, clip, vae, comfy.latent_formats.Flux2(), tmp_path)
    ref_err, cond_err = max_rel(enc["source"], theirs), max_rel(adapter.encoded_condition(enc).tokens["image"], cond)
    print(f"{size[0]}x{size[1]} -> {scaled.shape[2]}x{scaled.shape[1]}: reference latent rel {ref_err:.1e}, condition {cond_err:.1e}")
    assert enc["source"].shape == theirs.shape == (1, 128, scaled.shape[1] // 16, scaled.shape[2] // 16)
    assert ref_err <= 5 * RTOL and cond_err <= 5 * RTOL
    assert torch.equal(enc["target"], enc["source"])


# ---------------------------------------------------------------------------------------------
# End to end in a real server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def e2e(klein, tmp_path_factory):
    from diffusers import Flux2Transformer2DModel

    from trainer.data import pil_to_tensor
    from trainer.synthetic import make_examples

    cfg, adapter, _, _ = klein
    gen = E.train_generator(cfg)
    examples = make_examples("val", 2, resolution=32)
    source = examples[0].source
    instructions = [examples[0].instruction, examples[1].instruction]
    src = pil_to_tensor(source)[None]
    # the distilled checkpoint: the same architecture with other weights, run at 4 steps and cfg 1
    distilled_dir = tmp_path_factory.mktemp("klein_distilled") / "transformer"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        Flux2Transformer2DModel.from_config(adapter.transformer.config).eval().save_pretrained(distilled_dir)
    distilled = copy.copy(adapter)
    distilled.transformer = distilled.denoiser = Flux2Transformer2DModel.from_pretrained(distilled_dir).eval()
    ref = {"one": E.trainer_edit(adapter, gen, src, instructions[:1], STEPS, SEED),
           "two": E.trainer_edit(adapter, gen, src.repeat(2, 1, 1, 1), instructions, STEPS, SEED),
           "base": E.trainer_edit(adapter, gen, src, instructions[:1], STEPS, SEED, strength=0.0),
           "distilled": E.trainer_edit(distilled, gen, src, instructions[:1], 4, SEED, cfg=1.0),
           "distilled_base": E.trainer_edit(distilled, gen, src, instructions[:1], 4, SEED, strength=0.0, cfg=1.0)}
    with comfy_harness.ComfyServer(extra_models={"hywu": [gen]},
                                   custom_nodes=[comfy_harness.REPO / "tests" / "comfy_test_nodes"]) as srv:
        image = srv.put_input(source, "klein_e2e_source.png")
        yield srv, cfg, gen, image, instructions, ref, distilled_dir


def _graph(cfg, gen, image, instructions, mode, batch_index=-1, strength=1.0, transformer=None, megapixels=None):
    """The shipped template with only the loaders swapped for the test nodes, and ImageScaleToTotalPixels bypassed
    (or set to ``megapixels``)."""
    wf = E.template(TEMPLATE)
    base = cfg.base.path
    E.swap_node(wf, "UNETLoader", "HYWUTestTinyFlux2Loader", path=str(transformer or f"{base}/transformer"))
    E.swap_node(wf, "CLIPLoader", "HYWUTestTinyFlux2TE", path=base)
    E.swap_node(wf, "VAELoader", "HYWUTestTinyFlux2VAE", path=base)
    if megapixels is None:
        E.bypass_node(wf, "ImageScaleToTotalPixels", "image")
    else:
        E.set_inputs(wf, "ImageScaleToTotalPixels", megapixels=megapixels)
    assert wf[E.node_id(wf, "CFGGuider")]["inputs"]["cfg"] == 5.0  # the klein base template's CFG, the trainer's default
    E.set_inputs(wf, "LoadImage", image=image)
    E.set_inputs(wf, "HYWULoadGenerator", generator_name=gen.name)
    E.set_inputs(wf, "HYWUConditionEncode", instruction="\n".join(instructions), one_edit_per_line=len(instructions) > 1)
    E.set_inputs(wf, "HYWUApplyGeneratedLoRA", mode=mode, batch_index=batch_index, strength=strength)
    E.set_inputs(wf, "Flux2Scheduler", steps=STEPS)
    E.set_inputs(wf, "RandomNoise", noise_seed=SEED)
    return wf


@pytest.mark.parametrize("mode", ["runtime", "patch"])
def test_klein_template_matches_trainer(e2e, mode):
    srv, cfg, gen, image, instructions, ref, _ = e2e
    one = E.run_images(srv, _graph(cfg, gen, image, instructions[:1], mode, batch_index=0 if mode == "patch" else -1),
                       f"klein_{mode}_one")
    assert one.shape == ref["one"].shape == (1, 32, 32, 3)
    p_one = E.psnr(one, ref["one"])
    if mode == "runtime":  # one LoRA per sample
        two = E.run_images(srv, _graph(cfg, gen, image, instructions, mode), f"klein_{mode}_two")
        p_two = [E.psnr(two[i:i + 1], ref["two"][i:i + 1]) for i in range(2)]
    else:  # patch mode merges one LoRA: edit 1's LoRA on the whole batch, compared on edit 1's sample
        two = E.run_images(srv, _graph(cfg, gen, image, instructions, mode, batch_index=1), f"klein_{mode}_two")
        p_two = [E.psnr(two[1:2], ref["two"][1:2])]
    print(f"{mode}: PSNR vs trainer, 1 edit {p_one:.1f} dB, 2 edits {', '.join(f'{p:.1f}' for p in p_two)} dB")
    assert two.shape == (2, 32, 32, 3)
    assert p_one >= 40 and min(p_two) >= 40


def test_klein_lora_visibly_changes_the_image(e2e):
    srv, cfg, gen, image, instructions, ref, _ = e2e
    zero = E.run_images(srv, _graph(cfg, gen, image, instructions[:1], "runtime", strength=0.0), "klein_zero")
    p_base, p_effect = E.psnr(zero, ref["base"]), E.psnr(ref["one"], ref["base"])
    print(f"strength 0 vs trainer base {p_base:.1f} dB; trained LoRA vs strength 0 {p_effect:.1f} dB")
    assert p_base >= 40
    assert p_effect < 35 and math.isfinite(p_effect)


def test_klein_base_trained_lora_runs_on_the_distilled_model(e2e):
    """The distilled template's settings (4 steps, cfg 1) on another checkpoint of the same architecture: the
    base-trained generator's LoRA applies (every target matched) and the graph gives the trainer's own edit there.
    Whether the edit is good on the real distilled model is not tested here (docs/families.md)."""
    srv, cfg, gen, image, instructions, ref, distilled_dir = e2e
    wf = _graph(cfg, gen, image, instructions[:1], "runtime", transformer=distilled_dir)
    E.set_inputs(wf, "CFGGuider", cfg=1.0)
    out = E.run_images(srv, wf, "klein_distilled")
    p_match, p_effect = E.psnr(out, ref["distilled"]), E.psnr(ref["distilled"], ref["distilled_base"])
    print(f"distilled stand-in, 4 steps cfg 1: graph vs trainer {p_match:.1f} dB; LoRA vs strength 0 {p_effect:.1f} dB")
    assert p_match >= 40
    assert p_effect < 40 and math.isfinite(p_effect)


def test_klein_mixed_aspect_generator_in_the_template_at_a_non_square_size(klein, tmp_path_factory):
    """Trained on 200 pairs at 3:2, 9:16 and 1:1 (ai-toolkit's folder layout, base.buckets template at 0.01 MP) by
    `python -m trainer.train`, the generator runs in the shipped template with its ImageScaleToTotalPixels set to
    0.01 MP on a 9:16 source and gives the trainer's sampler image (the source scaled as training scaled it)."""
    from mixed_aspect import mixed_aspect_folders
    from trainer.buckets import template_scale
    from trainer.data import pil_to_tensor

    cfg, adapter, _, _ = klein
    data = mixed_aspect_folders(E.E2E_MODELS / "mixed-aspect-200", 200)
    bucketed = copy.deepcopy(cfg)
    bucketed.name = "e2e_flux2_klein_buckets"
    bucketed.base.buckets, bucketed.base.megapixels = "template", 0.01
    bucketed.data.source, bucketed.data.path, bucketed.data.n_train, bucketed.data.n_val = "folders", str(data), None, 3
    bucketed.train.max_steps, bucketed.train.batch_size = 12, 2
    gen = E.train_generator(bucketed)
    pil = picture(90, 160, seed=2)
    instruction = (data / "target" / "001.txt").read_text()
    source = template_scale("flux2_klein", 0.01)(pil_to_tensor(pil)[None])  # the trainer's row: 77 x 137
    ref = E.trainer_edit(adapter, gen, source, [instruction], STEPS, SEED)
    zero = E.trainer_edit(adapter, gen, source, [instruction], STEPS, SEED, strength=0.0)
    with comfy_harness.ComfyServer(extra_models={"hywu": [gen]},
                                   custom_nodes=[comfy_harness.REPO / "tests" / "comfy_test_nodes"]) as srv:
        image = srv.put_input(pil, "klein_e2e_tall.png")
        out = E.run_images(srv, _graph(bucketed, gen, image, [instruction], "runtime", megapixels=0.01), "klein_tall")
    p_match, p_effect = E.psnr(out, ref), E.psnr(ref, zero)
    print(f"9:16 source 90x160 -> {source.shape[-1]}x{source.shape[-2]}, output {out.shape[2]}x{out.shape[1]}: graph vs trainer "
          f"{p_match:.1f} dB; LoRA vs strength 0 {p_effect:.1f} dB")
    assert out.shape == ref.shape == (1, 128, 64, 3)  # VAE Encode's and EmptyFlux2LatentImage's multiples of 16
    assert p_match >= 40 and p_effect < 40
