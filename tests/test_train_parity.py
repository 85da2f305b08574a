"""Condition parity, SD1.5 family, in real ComfyUI (in-process): the trainer's condition features and
the node pack's Condition Encode features agree for the same image, instruction and seeded weights.

Tolerance (fp32 on CPU, micro base from scripts/build_micro_base.py): max |diff| <= 1e-5 * max|x| for the
text tokens (CLIP-L: transformers vs ComfyUI's implementation) and the image tokens (TAESD: diffusers vs
ComfyUI); measured about 8e-7 for both.

Also: a generator trained by trainer.train loads through the Load Generator node.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_harness
from mixed_aspect import as_comfy, comfy_scaled, condition_encode_image, max_rel, picture, trainer_row

TEXT_RTOL, IMAGE_RTOL = 1e-5, 1e-5  # measured here: ~8e-7 for both
INSTRUCTIONS = ["make the picture brighter", "turn the red circle blue"]


@pytest.fixture(scope="module")
def comfy_parts(micro_base):
    comfy_harness.import_comfy(micro_base.comfyui, extra_modules=("comfy.sd", "comfy.utils", "comfy.model_management", "comfy_api.latest"))
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(micro_base.checkpoint), output_vae=True, output_clip=True)
    return model, clip, vae


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-8)).item()


@pytest.mark.parametrize("text_layer,text_mask", [(-1, False), (-2, True)])
def test_condition_parity_sd15(comfy_parts, micro_base, tmp_path, text_layer, text_mask):
    from hywu_nodes.core import GeneratorConfig, HYWUGenerator, build_target_spec, save_generator
    from hywu_nodes.nodes.encode import encode_condition
    from hywu_nodes.nodes.load_generator import load_generator_handle
    from trainer.config import TrainConfig
    from trainer.data import pil_to_tensor
    from trainer.families import load_family
    from trainer.synthetic import make_examples

    model, clip, vae = comfy_parts
    cfg = TrainConfig()
    cfg.base.family, cfg.base.path, cfg.base.resolution = "sd15_ip2p", str(micro_base.diffusers_dir), 64
    cfg.base.text_layer, cfg.base.text_mask = text_layer, text_mask
    torch.set_num_threads(1)
    adapter = load_family(cfg, torch.device("cpu"), torch.float32)

    # A seeded generator file with the trainer's condition spec, read back through the node pack.
    torch.manual_seed(0)
    spec = build_target_spec(adapter.denoiser, "sd15_ip2p", include=[r"attn2\.to_q$"])
    path = tmp_path / "parity.safetensors"
    save_generator(path, HYWUGenerator(GeneratorConfig.from_preset("tiny", rank=4, alpha=4.0), spec, adapter.condition_spec))
    handle = load_generator_handle(str(path))
    assert handle.condition_spec == adapter.condition_spec

    for i, (example, text) in enumerate(zip(make_examples("val", 2, resolution=96), INSTRUCTIONS)):
        img = example.source.resize((96, 80), Image.BICUBIC)  # non-square: both sides resize + centre-crop
        # Trainer side: the data pipeline's tensor, then the family adapter (square bucket inside the data loader).
        from hywu_nodes.core import square_resize

        src = square_resize(pil_to_tensor(img)[None], 64).clamp(0, 1)
        ours = adapter.encode_condition(src, [text])
        # ComfyUI side: IMAGE (B, H, W, 3) like Load Image gives, through the node pack's encoder.
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        theirs, _ = encode_condition(handle.condition_spec, image, text, clip, vae=vae, model_latent_format=model.model.latent_format)
        assert ours.tokens["text"].shape == theirs.tokens["text"].shape == (1, 77, 768)
        assert ours.tokens["image"].shape == theirs.tokens["image"].shape == (1, 16, 16)
        t_err, i_err = _rel(ours.tokens["text"], theirs.tokens["text"]), _rel(ours.tokens["image"], theirs.tokens["image"])
        print(f"parity example {i}: text rel err {t_err:.2e}, image rel err {i_err:.2e}")
        assert t_err <= TEXT_RTOL, t_err
        assert i_err <= IMAGE_RTOL, i_err
        if text_mask:  # the prompt's own tokens: BOS, the words, the first end token
            n_prompt = len(adapter.tokenizer(text).input_ids)
            assert torch.equal(ours.masks["text"], theirs.masks["text"])
            assert ours.masks["text"].sum().item() == n_prompt < 77
        else:
            assert not ours.masks and not theirs.masks
        if text_layer != -1:  # really another layer than the sampler's conditioning
            assert _rel(ours.tokens["text"], adapter.encode_text([text]).float()) > 1e-2


def test_trained_generator_loads_in_load_generator_node(comfy_parts, tmp_path):
    import folder_paths

    from hywu_nodes.nodes.load_generator import HYWULoadGenerator
    from trainer.tiny_bases import tiny_config
    from trainer.train import run

    torch.set_num_threads(1)
    summary = run(tiny_config("sd15_ip2p", tmp_path / "run", train={"max_steps": 2}), progress=False)
    saved = folder_paths.folder_names_and_paths.get("hywu")
    try:
        folder_paths.add_model_folder_path("hywu", str(tmp_path / "run"))
        folder_paths.filename_list_cache.pop("hywu", None)
        out = HYWULoadGenerator.execute(generator_name="tiny_sd15_ip2p.safetensors")
    finally:
        if saved is not None:
            folder_paths.folder_names_and_paths["hywu"] = saved
        folder_paths.filename_list_cache.pop("hywu", None)
    handle = out.result[0] if hasattr(out, "result") else out[0]
    assert handle.family == "sd15_ip2p" and handle.info.extra["steps"] == 2


def test_ip2p_denoiser_input_matches_comfyui(comfy_parts, micro_base):
    """The UNet input the trainer builds (noisy latent + source latent) is the one ComfyUI's
    InstructPixToPixConditioning builds: channels 4-7 are the raw (unscaled) VAE latent."""
    from trainer.config import TrainConfig
    from trainer.families import load_family
    from trainer.synthetic import make_examples

    model, _, vae = comfy_parts
    cfg = TrainConfig()
    cfg.base.family, cfg.base.path, cfg.base.resolution = "sd15_ip2p", str(micro_base.diffusers_dir), 64
    cfg.train.drop_text, cfg.train.drop_image = 0.0, 0.0
    adapter = load_family(cfg, torch.device("cpu"), torch.float32)
    ex = make_examples("val", 1, resolution=64)[0]
    image = torch.from_numpy(np.asarray(ex.source, dtype=np.float32) / 255.0)[None]
    target = torch.from_numpy(np.asarray(ex.target, dtype=np.float32) / 255.0)[None]
    batch = {"source": image.movedim(-1, 1), "target": target.movedim(-1, 1), "instruction": [ex.instruction]}
    x = adapter.prepare(batch, step=0, keys=[0])["x"]
    comfy_concat = vae.encode(image)  # what InstructPixToPixConditioning stores and the model concatenates
    comfy_model_space = model.model.latent_format.process_in(vae.encode(target))
    err = _rel(x[:, 4:], comfy_concat)
    print(f"IP2P concat rel err {err:.2e}")
    assert err <= IMAGE_RTOL, err
    # ...and the latent the trainer noises (x0) is ComfyUI's model-space latent (raw * 0.18215).
    x0_err = _rel(adapter.vae_latent(batch["target"]), comfy_model_space)
    assert x0_err <= IMAGE_RTOL, x0_err


@torch.no_grad()
@pytest.mark.parametrize("size", [(150, 100), (90, 160)], ids=["3:2", "9:16"])
def test_ip2p_template_bucket_parity(comfy_parts, micro_base, size, tmp_path):
    """base.buckets template (0.01 MP) on a non-square source: the image is the SD1.5 template's
    ImageScaleToTotalPixels (lanczos, bit-equal); the UNet's image latent is InstructPixToPixConditioning's
    concat_latent_image (its crop to multiples of 8, VAE encode) and the sampler's latent has its size; the
    generator's image condition is Condition Encode's on the scaled image."""
    from trainer.config import TrainConfig
    from trainer.families import load_family
    from trainer.families.sd15_ip2p import SD15_LATENT_SCALE

    nodes = comfy_harness.load_comfy_nodes(micro_base.comfyui)
    model, clip, vae = comfy_parts
    cfg = TrainConfig()
    cfg.base.family, cfg.base.path, cfg.base.resolution = "sd15_ip2p", str(micro_base.diffusers_dir), 64
    adapter = load_family(cfg, torch.device("cpu"), torch.float32)
    pil = picture(*size, seed=1)
    scaled = comfy_scaled("sd15_ip2p", as_comfy(pil), megapixels=0.01)
    batch, enc = trainer_row(adapter, pil, megapixels=0.01)
    assert torch.equal(batch["source"], scaled.movedim(-1, 1))
    cond = nodes["CLIPTextEncode"]().encode(clip, "make it brighter")[0]
    positive, _, latent = nodes["InstructPixToPixConditioning"].execute(cond, cond, scaled, vae)[:3]
    concat = positive[0][1]["concat_latent_image"]
    ours = enc["source"] / SD15_LATENT_SCALE  # what prepare_encoded concatenates
    image = condition_encode_image(adapter, scaled, clip, vae, model.model.latent_format, tmp_path)
    errs = max_rel(ours, concat), max_rel(adapter.encoded_condition(enc).tokens["image"], image)
    print(f"{size[0]}x{size[1]} -> {scaled.shape[2]}x{scaled.shape[1]}: concat latent {tuple(concat.shape[-2:])} rel {errs[0]:.1e}, "
          f"condition rel {errs[1]:.1e}")
    assert ours.shape == concat.shape == latent["samples"].shape and max(errs) <= IMAGE_RTOL
