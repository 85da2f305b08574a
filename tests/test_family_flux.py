"""FLUX.1 Kontext, trained here and run there: condition parity and the shipped template end to end.

Base: the trainer's tiny FLUX base in its ComfyUI variant (trainer/tiny_bases.py with a ComfyUI path:
ComfyUI's shipped CLIP-L and T5 tokenizers, T5 v1.1 block, 16 latent channels). ComfyUI side: its own
classes through the test-only nodes in tests/comfy_test_nodes (tiny_dit.py: FLUX DiT; tiny_flux_te.py:
FluxClipModel/FluxTokenizer as DualCLIPLoader builds them, and the VAE), everything else is the shipped
template example_workflows/api/hywu_edit_flux_kontext.json.

Parity (in-process, fp32 CPU): token ids of ComfyUI's FluxTokenizer = the trainer's (T5 padded to 256, CLIP-L
to 77); T5 sequence and CLIP-L pooled of ComfyUI's encoder classes vs transformers (measured max abs diff
about 8e-6 and 6e-7, relative 3e-6 / 5e-7); the image condition (VAE latent through Flux
latent_format.process_in) vs the trainer's latent (about 1e-7), also for the full-size FLUX AE through
comfy.sd.VAE's own detection (VAELoader's path; latent 1.6e-7, decode 2e-6); the trainer's sampler
schedule vs KSampler euler / simple on ComfyUI's FLUX model sampling.

End to end (real server, POST /prompt): a generator trained by `python -m trainer.train` (20 steps, cached
under models/e2e/) in the template graph gives the trainer's own edit (FlowMatchingFamily.sample, 4 Euler
steps on ComfyUI's FLUX schedule, guidance = the file's flux_guidance) at PSNR >= 40 dB, in runtime and patch
mode, for 1 edit and 2 edits in one batch; strength 0 differs from strength 1 by PSNR < 35 dB. Only the
loaders are swapped, and FluxKontextImageScale is bypassed: it scales every source to about 1 megapixel
(1024x1024 for a square one), far too slow for tiny CPU tests; test_kontext_scale_vs_trainer_resize measures
what it does against the trainer's resize instead.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import comfy_harness
import family_e2e as E
from hywu_graphs import make_test_image
from mixed_aspect import as_comfy, comfy_scaled, condition_encode_image, max_rel, picture, trainer_row

FLOOR = pytest.mark.floor  # also on ComfyUI 0.3.75, the requires-comfyui floor (Makefile): every test but one bucket case

STEPS, SEED = 4, 0
TEXT_RTOL, IMAGE_RTOL = 1e-5, 1e-5
INSTRUCTIONS = ["turn the red circle blue", "make the picture brighter, please", "Add a small green square at the top-left corner."]
TEMPLATE = "hywu_edit_flux_kontext"


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(train config, in-process trainer adapter, ComfyUI CLIP, ComfyUI VAE, nodes) on the ComfyUI-variant tiny base."""
    comfyui = comfy_harness.comfyui_path()
    comfy_harness.load_comfy_nodes(comfyui)
    from comfy_test_nodes.tiny_flux_te import tiny_flux_clip, tiny_vae
    from trainer.families import load_family
    from trainer.tiny_bases import tiny_config

    cfg = tiny_config("flux_kontext", tmp_path_factory.mktemp("unused"), comfyui=comfyui,
                      train={"max_steps": 20, "lr": 3e-3}, data={"n_train": 16, "n_val": 2})
    cfg.name = "e2e_flux_kontext"
    adapter = load_family(cfg, torch.device("cpu"), torch.float32)
    return cfg, adapter, tiny_flux_clip(cfg.base.path), tiny_vae(cfg.base.path)


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@FLOOR
@torch.no_grad()
def test_flux_text_parity(flux):
    """ComfyUI's shipped tokenizers and encoder classes (DualCLIPLoader's FluxClipModel) = the trainer's."""
    _, adapter, clip, _ = flux
    for text in INSTRUCTIONS:
        tokens = clip.tokenize(text)
        t5_ids = [t[0] for t in tokens["t5xxl"][0]]
        clip_ids = [t[0] for t in tokens["l"][0]]
        ours_t5 = adapter.t5_tok([text], padding="max_length", max_length=adapter.text_tokens, truncation=True).input_ids[0]
        ours_clip = adapter.clip_tok([text], padding="max_length", max_length=77, truncation=True).input_ids[0]
        assert len(tokens["t5xxl"]) == len(tokens["l"]) == 1
        assert t5_ids == list(ours_t5) and len(t5_ids) == adapter.text_tokens == 256
        assert clip_ids == list(ours_clip) and len(clip_ids) == 77
        # masks: neither side masks T5 for FLUX (ComfyUI: attention_mask=False; diffusers: no mask either)
        assert clip.cond_stage_model.t5xxl.enable_attention_masks is False
        out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        seq, pooled = adapter.encode_text([text])
        t_err, p_err = _max_rel(out["cond"], seq), _max_rel(out["pooled_output"], pooled)
        print(f"'{text[:24]}': T5 seq max abs {float((out['cond'] - seq).abs().max()):.1e} (rel {t_err:.1e}), "
              f"CLIP-L pooled max abs {float((out['pooled_output'] - pooled).abs().max()):.1e} (rel {p_err:.1e})")
        assert out["cond"].shape == seq.shape == (1, 256, 32) and t_err <= TEXT_RTOL
        assert out["pooled_output"].shape == pooled.shape == (1, 32) and p_err <= TEXT_RTOL


@FLOOR
@torch.no_grad()
def test_flux_condition_encode_parity(flux, tmp_path):
    """HY-WU Condition Encode's features (ComfyUI CLIP + VAE + Flux latent_format) = the trainer's condition."""
    import comfy.latent_formats

    from hywu_nodes.core import GeneratorConfig, HYWUGenerator, build_target_spec, save_generator
    from hywu_nodes.nodes.encode import encode_condition
    from hywu_nodes.nodes.load_generator import load_generator_handle
    from trainer.data import pil_to_tensor

    _, adapter, clip, vae = flux
    torch.manual_seed(0)
    spec = build_target_spec(adapter.denoiser, "flux_kontext", include=[r"attn\.to_q$"])
    path = tmp_path / "parity.safetensors"
    save_generator(path, HYWUGenerator(GeneratorConfig.from_preset("tiny", rank=4, alpha=4.0), spec, adapter.condition_spec))
    handle = load_generator_handle(str(path))
    for i, text in enumerate(INSTRUCTIONS[:2]):
        img = make_test_image(i, size=32)
        ours = adapter.encode_condition(pil_to_tensor(img)[None], [text])
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        theirs, conditioning = encode_condition(handle.condition_spec, image, text, clip, vae=vae,
                                                model_latent_format=comfy.latent_formats.Flux())
        assert ours.tokens["image"].shape == theirs.tokens["image"].shape == (1, 4, 64)  # 4x4x16 latent, 2x2 patches
        i_err, t_err = _max_rel(theirs.tokens["image"], ours.tokens["image"]), _max_rel(theirs.tokens["text"], ours.tokens["text"])
        print(f"condition {i}: image tokens max abs {float((theirs.tokens['image'] - ours.tokens['image']).abs().max()):.1e}, "
              f"text rel {t_err:.1e}")
        assert i_err <= IMAGE_RTOL and t_err <= TEXT_RTOL
        assert not ours.masks and not theirs.masks
        # the sampler's conditioning is DualCLIPLoader + CLIPTextEncode's: T5 sequence + CLIP-L pooled
        assert _max_rel(conditioning[0][1]["pooled_output"], adapter.encode_text([text])[1]) <= TEXT_RTOL


@FLOOR
@torch.no_grad()
def test_flux_ae_full_size_through_vae_detection(flux):
    """The FLUX AE at full size (trainer/architectures, seeded weights) through what VAELoader does with
    ae.safetensors: comfy.sd.VAE's own diffusers key conversion and detection -> AutoencodingEngine. Its
    latent through Flux latent_format.process_in, and the decode, equal the trainer's (FluxKontext.latent /
    decode_latent). (The tiny base's VAE needs an explicit config: detection fixes these widths.)"""
    from types import SimpleNamespace

    import comfy.latent_formats
    import comfy.ldm.models.autoencoder
    import comfy.sd

    from trainer.data import pil_to_tensor
    from trainer.families.flux_kontext import FluxKontext
    from trainer.full_bases import build_component

    ae = build_component("flux_kontext", "vae", device="cpu")
    vae = comfy.sd.VAE(sd={k: v.clone() for k, v in ae.state_dict().items()})
    assert type(vae.first_stage_model) is comfy.ldm.models.autoencoder.AutoencodingEngine and vae.latent_channels == 16
    trainer = SimpleNamespace(vae=ae, device=torch.device("cpu"), dtype=torch.float32, vae_pixels=lambda x: x)  # 32 px: no crop
    src = pil_to_tensor(make_test_image(5, size=32))[None]
    ours = FluxKontext.latent(trainer, src)
    raw = vae.encode(src.movedim(1, -1))
    theirs = comfy.latent_formats.Flux().process_in(raw)
    err = _max_rel(theirs, ours)
    decoded = vae.decode(raw)
    ours_decoded = ((FluxKontext.decode_latent(trainer, ours) + 1) / 2).clamp(0, 1).movedim(1, -1)
    print(f"FLUX AE (83.8M) via comfy.sd.VAE detection: latent max abs {float((theirs - ours).abs().max()):.1e} "
          f"(rel {err:.1e}), decode max abs {float((decoded - ours_decoded).abs().max()):.1e}")
    assert ours.shape == theirs.shape == (1, 16, 4, 4) and err <= IMAGE_RTOL
    assert float((decoded - ours_decoded).abs().max()) <= 1e-4


@FLOOR
def test_flux_schedule_is_comfyui_simple(flux):
    """The trainer's FLUX sampler steps through the sigmas ComfyUI's KSampler (euler, simple) uses on FLUX."""
    import comfy.samplers
    from comfy_test_nodes.tiny_dit import tiny_dit_patcher

    cfg, adapter, _, _ = flux
    patcher = tiny_dit_patcher(f"{cfg.base.path}/transformer")
    for steps in (1, 4, 20):
        ours = adapter.sample_sigmas(steps)
        theirs = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", steps)
        assert float((ours - theirs).abs().max()) < 1e-6, (steps, ours, theirs)


@FLOOR
def test_kontext_scale_vs_trainer_resize():
    """FluxKontextImageScale (the template's reference resize) against the trainer's square_resize at 1024 px:
    a square source both bring to 1024x1024 (lanczos vs antialiased bilinear: close, measured here); a
    non-square one FluxKontextImageScale keeps near its aspect ratio, where the trainer crops a square."""
    from hywu_nodes.core import square_resize

    nodes = comfy_harness.load_comfy_nodes()
    scale = nodes["FluxKontextImageScale"]
    img = torch.from_numpy(np.asarray(make_test_image(3, size=1536), dtype=np.float32) / 255.0)[None]
    theirs = scale.execute(img)[0]
    ours = square_resize(img.movedim(-1, 1), 1024).clamp(0, 1).movedim(1, -1)
    assert theirs.shape == ours.shape == (1, 1024, 1024, 3)
    p = E.psnr(E.to_uint8(theirs), E.to_uint8(ours))
    print(f"square 1536 -> 1024: FluxKontextImageScale vs trainer square_resize PSNR {p:.1f} dB")
    assert p > 35
    wide = torch.rand(1, 600, 900, 3)
    assert tuple(scale.execute(wide)[0].shape[1:3]) == (832, 1248)  # kept at 2:3, where base.resolution crops to a square


@torch.no_grad()
@pytest.mark.parametrize("size", [pytest.param((150, 100), id="3:2"),  # 0.30 only: the test-time budget
                                  pytest.param((90, 160), id="9:16", marks=FLOOR)])
def test_kontext_template_bucket_parity(flux, size, tmp_path):
    """base.buckets template on a non-square source: the image the trainer gives the base is FluxKontextImageScale's
    (bit-equal), its latent (the reference, and the sampler's latent: one VAE Encode) is ComfyUI's VAE Encode in
    the Flux latent format, and the generator's image condition is Condition Encode's on the scaled image."""
    import comfy.latent_formats

    _, adapter, clip, vae = flux
    pil = picture(*size, seed=1)
    scaled = comfy_scaled("flux_kontext", as_comfy(pil))
    batch, enc = trainer_row(adapter, pil)
    assert torch.equal(batch["source"], scaled.movedim(-1, 1))
    fmt = comfy.latent_formats.Flux()
    theirs = fmt.process_in(vae.encode(scaled))
    cond = condition_encode_image(adapter, scaled, clip, vae, fmt, tmp_path)
    ref_err, cond_err = max_rel(enc["source"], theirs), max_rel(adapter.encoded_condition(enc).tokens["image"], cond)
    print(f"{size[0]}x{size[1]} -> {scaled.shape[2]}x{scaled.shape[1]}: reference latent rel {ref_err:.1e}, condition {cond_err:.1e}")
    assert enc["source"].shape == theirs.shape and ref_err <= IMAGE_RTOL and cond_err <= IMAGE_RTOL
    assert torch.equal(enc["target"], enc["source"])  # the target (here the source itself) takes the same path


# ---------------------------------------------------------------------------------------------
# End to end in a real server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def e2e(flux, tmp_path_factory):
    from trainer.data import pil_to_tensor
    from trainer.synthetic import make_examples

    cfg, adapter, _, _ = flux
    gen = E.train_generator(cfg)
    examples = make_examples("val", 2, resolution=32)
    source = examples[0].source
    instructions = [examples[0].instruction, examples[1].instruction]
    src = pil_to_tensor(source)[None]
    ref = {"one": E.trainer_edit(adapter, gen, src, instructions[:1], STEPS, SEED),
           "two": E.trainer_edit(adapter, gen, src.repeat(2, 1, 1, 1), instructions, STEPS, SEED),
           "base": E.trainer_edit(adapter, gen, src, instructions[:1], STEPS, SEED, strength=0.0)}
    with comfy_harness.ComfyServer(extra_models={"hywu": [gen]},
                                   custom_nodes=[comfy_harness.REPO / "tests" / "comfy_test_nodes"]) as srv:
        image = srv.put_input(source, "flux_e2e_source.png")
        yield srv, cfg, gen, image, instructions, ref


def _graph(cfg, gen, image, instructions, mode, batch_index=-1, strength=1.0, guidance=None):
    """The shipped template with only the loaders swapped for the test nodes (and FluxKontextImageScale bypassed)."""
    from hywu_nodes.core import read_generator_info

    wf = E.template(TEMPLATE)
    base = cfg.base.path
    E.swap_node(wf, "UNETLoader", "HYWUTestTinyDiTLoader", path=f"{base}/transformer")
    E.swap_node(wf, "DualCLIPLoader", "HYWUTestTinyFluxTE", path=base)
    E.swap_node(wf, "VAELoader", "HYWUTestTinyVAE", path=base)
    E.bypass_node(wf, "FluxKontextImageScale", "image")
    trained = read_generator_info(gen).extra["flux_guidance"]
    assert wf[E.node_id(wf, "FluxGuidance")]["inputs"]["guidance"] == trained == 2.5  # the template agrees with training
    if guidance is not None:
        E.set_inputs(wf, "FluxGuidance", guidance=guidance)
    E.set_inputs(wf, "LoadImage", image=image)
    E.set_inputs(wf, "HYWULoadGenerator", generator_name=gen.name)
    E.set_inputs(wf, "HYWUConditionEncode", instruction="\n".join(instructions), one_edit_per_line=len(instructions) > 1)
    E.set_inputs(wf, "HYWUApplyGeneratedLoRA", mode=mode, batch_index=batch_index, strength=strength)
    E.set_inputs(wf, "KSampler", steps=STEPS, seed=SEED)  # euler / simple / cfg 1 as shipped
    return wf


@FLOOR
@pytest.mark.parametrize("mode", ["runtime", "patch"])
def test_flux_template_matches_trainer(e2e, mode):
    srv, cfg, gen, image, instructions, ref = e2e
    one = E.run_images(srv, _graph(cfg, gen, image, instructions[:1], mode, batch_index=0 if mode == "patch" else -1),
                       f"flux_{mode}_one")
    assert one.shape == ref["one"].shape == (1, 32, 32, 3)
    p_one = E.psnr(one, ref["one"])
    if mode == "runtime":  # one LoRA per sample
        two = E.run_images(srv, _graph(cfg, gen, image, instructions, mode), f"flux_{mode}_two")
        p_two = [E.psnr(two[i:i + 1], ref["two"][i:i + 1]) for i in range(2)]
    else:  # patch mode merges one LoRA: edit 1's LoRA on the whole batch, compared on edit 1's sample
        two = E.run_images(srv, _graph(cfg, gen, image, instructions, mode, batch_index=1), f"flux_{mode}_two")
        p_two = [E.psnr(two[1:2], ref["two"][1:2])]
    print(f"{mode}: PSNR vs trainer, 1 edit {p_one:.1f} dB, 2 edits {', '.join(f'{p:.1f}' for p in p_two)} dB")
    assert two.shape == (2, 32, 32, 3)
    assert p_one >= 40 and min(p_two) >= 40


@FLOOR
def test_flux_lora_visibly_changes_the_image(e2e):
    srv, cfg, gen, image, instructions, ref = e2e
    zero = E.run_images(srv, _graph(cfg, gen, image, instructions[:1], "runtime", strength=0.0), "flux_zero")
    p_base = E.psnr(zero, ref["base"])
    p_effect = E.psnr(ref["one"], ref["base"])
    p_two = E.psnr(ref["two"][0:1], ref["two"][1:2])
    # the rule "FluxGuidance = the guidance the generator was trained at" matters: the old 1.0 gives another image
    other = E.run_images(srv, _graph(cfg, gen, image, instructions[:1], "runtime", guidance=1.0), "flux_guidance1")
    p_guidance = E.psnr(other, ref["one"])
    print(f"strength 0 vs trainer base {p_base:.1f} dB; trained LoRA vs strength 0 {p_effect:.1f} dB; "
          f"edit 1 vs edit 2 {p_two:.1f} dB; FluxGuidance 1.0 vs the trained 2.5 {p_guidance:.1f} dB")
    assert p_base >= 40
    assert p_effect < 35 and math.isfinite(p_effect)
    assert p_guidance < 40
    log = srv.log_tail(10**7)
    assert "was trained at FLUX guidance 2.5: set the graph's FluxGuidance to 2.5" in log  # Load Generator says so
    # and HY-WU Apply's check sees the sampler's guidance: it warns for 1.0, never for the trained 2.5
    assert "the sampler runs the FLUX model at guidance 1, but the generator" in log
    assert "at guidance 2.5, but the generator" not in log


@FLOOR
def test_guidance_option_is_checked(tmp_path):
    """base.guidance belongs to flux_kontext; a generator file's flux_guidance is validated like every field."""
    from hywu_nodes.core import (ConditionSource, ConditionSpec, GeneratorConfig, GeneratorFileError, HYWUGenerator,
                                 LinearTarget, TargetSpec, read_generator_info, save_generator)
    from trainer.config import ConfigError, TrainConfig, set_dotted, validate

    cfg = TrainConfig()
    cfg.base.path = "x"
    set_dotted(cfg, "base.guidance", "2.5")
    with pytest.raises(ConfigError, match="base.guidance"):
        validate(cfg)  # sd15_ip2p has CFG, no embedded guidance
    cfg.base.family = "flux_kontext"
    validate(cfg)
    cfg.base.guidance = -1.0
    with pytest.raises(ConfigError, match="base.guidance"):
        validate(cfg)
    gen = HYWUGenerator(GeneratorConfig.from_preset("tiny", rank=2, alpha=2.0),
                        TargetSpec("flux_kontext", (LinearTarget("transformer_blocks.0.attn.to_q", 8, 8, 0),)),
                        ConditionSpec((ConditionSource("text", "text_hidden_states", 8, 4),)))
    for value, ok in ((2.5, True), ("2.5", False), (float("nan"), False), (1e9, False)):
        path = tmp_path / f"g{len(str(value))}.safetensors"
        save_generator(path, gen, extra={"flux_guidance": value})
        if ok:
            assert read_generator_info(path).extra["flux_guidance"] == value
        else:
            with pytest.raises(GeneratorFileError, match="flux_guidance"):
                read_generator_info(path)
