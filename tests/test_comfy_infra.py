"""Real-ComfyUI infrastructure tests: the seeded micro SD1.5-IP2P base loads in the ComfyUI under test,
matches diffusers numerically, runs end to end through POST /prompt, and the frontend opens."""
import os
import time

import numpy as np
import pytest
import torch

import comfy_harness
import frontend

PROMPT = "make the sky purple, add a small red boat"
# fp32 on CPU; the checkpoint is fp16 but the diffusers weights are fp16-representable.
TOL_UNET = 1e-4
TOL_CLIP = 1e-4
TOL_VAE = 1e-5


@pytest.fixture(scope="module")
def comfy_loaded(micro_base):
    comfy_harness.import_comfy(micro_base.comfyui)
    import comfy.model_management
    import comfy.sd

    t0 = time.time()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(micro_base.checkpoint))
    comfy.model_management.load_model_gpu(model)
    return model, clip, vae, time.time() - t0


def test_checkpoint_loads_as_sd15_ip2p_with_taesd(comfy_loaded):
    model, clip, vae, secs = comfy_loaded
    assert type(model.model.model_config).__name__ == "SD15_instructpix2pix"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert abs(vae.first_stage_model.vae_scale.item() - 0.18215) < 1e-6
    assert model.model.diffusion_model.in_channels == 8
    print(f"load_checkpoint_guess_config: {secs:.2f}s")


def test_unet_parity(comfy_loaded, micro_base):
    from diffusers import UNet2DConditionModel

    model = comfy_loaded[0]
    unet = UNet2DConditionModel.from_pretrained(micro_base.diffusers_dir, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        out = model.model.diffusion_model(x, t, context=ctx).float()
    diff = (ref - out).abs().max().item()
    print(f"UNet parity max|diff| = {diff:.3g} (mean|ref| {ref.abs().mean():.3g})")
    assert diff < TOL_UNET


def test_clip_parity(comfy_loaded, micro_base):
    from transformers import CLIPTextModel, CLIPTokenizer

    clip = comfy_loaded[1]
    te = CLIPTextModel.from_pretrained(micro_base.diffusers_dir, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(micro_base.diffusers_dir, subfolder="tokenizer")
    ids = tok(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    tokens = clip.tokenize(PROMPT)
    comfy_ids = [t[0] for t in tokens["l"][0]]
    assert comfy_ids == ids[0].tolist(), "ComfyUI and transformers tokenization differ"
    assert comfy_ids[-1] == 49407  # padded with the end token
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    with torch.no_grad():
        o = te(ids)
    diff = (o.last_hidden_state - cond.float()).abs().max().item()
    pdiff = (o.pooler_output - pooled.float()).abs().max().item()
    print(f"CLIP parity: cond max|diff| = {diff:.3g}, pooled {pdiff:.3g} (mean|cond| {cond.abs().mean():.3g})")
    assert cond.shape == (1, 77, 768)
    assert diff < TOL_CLIP and pdiff < TOL_CLIP


def test_vae_parity(comfy_loaded, micro_base):
    from diffusers import AutoencoderTiny

    vae = comfy_loaded[2]
    v = AutoencoderTiny.from_pretrained(micro_base.diffusers_dir, subfolder="vae").eval()
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 64, 64, 3, generator=g)  # ComfyUI IMAGE: BHWC in [0, 1]
    z_comfy = vae.encode(img).float()
    with torch.no_grad():
        z_diff = v.encode(img.permute(0, 3, 1, 2) * 2 - 1).latents
    enc = (z_comfy * 0.18215 - z_diff).abs().max().item()
    dec_comfy = vae.decode(z_comfy).float()
    with torch.no_grad():
        dec_diff = ((v.decode(z_comfy * 0.18215).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    dec = (dec_comfy - dec_diff).abs().max().item()
    print(f"VAE parity: encode max|comfy*0.18215 - diffusers| = {enc:.3g}, decode {dec:.3g}")
    assert z_comfy.shape == (1, 4, 8, 8)
    assert enc < TOL_VAE * max(1.0, z_diff.abs().max().item())
    assert dec < 1e-4


def test_ip2p_condition_parity(comfy_loaded, micro_base):
    """Whole ComfyUI IP2P denoiser step (InstructPixToPixConditioning semantics: concat =
    vae.encode(pixels), NOT process_latent_in'd for SD15_instructpix2pix) vs diffusers parts.

    The relation the trainer must follow to match ComfyUI:
        noisy latent (UNet ch 0-3)   = AutoencoderTiny latent            (= comfy LATENT * 0.18215)
        image concat (UNet ch 4-7)   = AutoencoderTiny latent / 0.18215  (= comfy LATENT as is)
        context                      = CLIPTextModel(ids).last_hidden_state
    (diffusers' StableDiffusionInstructPix2PixPipeline with an AutoencoderTiny concatenates the
    UNscaled-by-0.18215 TAESD latent instead, so it differs from ComfyUI in channels 4-7.)
    """
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model, clip, vae, _ = comfy_loaded
    d = micro_base.diffusers_dir
    unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet").eval()
    v = AutoencoderTiny.from_pretrained(d, subfolder="vae").eval()
    te = CLIPTextModel.from_pretrained(d, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer")

    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 64, 64, 3, generator=g)
    cond = clip.encode_from_tokens(clip.tokenize(PROMPT)).float()
    concat = vae.encode(img).float()  # what InstructPixToPixConditioning stores
    x = torch.randn(1, 4, 8, 8, generator=g) * 3.0
    sigma = torch.tensor([3.0])
    conds = model.model.extra_conds(concat_latent_image=concat, noise=x, device=torch.device("cpu"),
                                    cross_attn=cond)
    with torch.no_grad():
        denoised = model.model.apply_model(x, sigma, c_concat=conds["c_concat"].cond,
                                           c_crossattn=conds["c_crossattn"].cond).float()
    eps_comfy = (x - denoised) / sigma

    ms = model.model.model_sampling
    t = ms.timestep(sigma).float()
    ids = tok(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = te(ids).last_hidden_state
        z_img = v.encode(img.permute(0, 3, 1, 2) * 2 - 1).latents
        x_in = x / (sigma ** 2 + 1) ** 0.5
        eps_diff = unet(torch.cat([x_in, z_img / 0.18215], 1), t, ctx).sample
        eps_wrong = unet(torch.cat([x_in, z_img], 1), t, ctx).sample
    diff = (eps_comfy - eps_diff).abs().max().item()
    wrong = (eps_comfy - eps_wrong).abs().max().item()
    print(f"IP2P step parity: max|diff| = {diff:.3g} (with unscaled concat it would be {wrong:.3g})")
    assert diff < 1e-4


def test_diffusers_ip2p_pipeline_loads_and_runs(micro_base):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(micro_base.diffusers_dir)
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and pipe.unet.config.in_channels == 8
    img = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    out = pipe(PROMPT, image=img, num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def _ip2p_workflow(image_name, ckpt_name, prefix="hywu_infra"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "5": {"class_type": "InstructPixToPixConditioning",
              "inputs": {"positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "pixels": ["4", 0]}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["5", 0], "negative": ["5", 1], "latent_image": ["5", 2],
                         "seed": 0, "steps": 2, "cfg": 1.5, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def test_e2e_prompt_core_ip2p(comfy_server, micro_base):
    from PIL import Image

    rng = np.random.default_rng(0)
    name = comfy_server.put_input(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                                  "hywu_infra_src.png")
    t0 = time.time()
    entry = comfy_server.run(_ip2p_workflow(name, micro_base.checkpoint.name), timeout=300)
    secs = time.time() - t0
    paths = comfy_server.output_images(entry)
    print(f"e2e prompt: {secs:.2f}s (server start {comfy_server.start_seconds:.1f}s)")
    assert entry["status"]["status_str"] == "success"
    assert len(paths) == 1 and paths[0].is_file()
    with Image.open(paths[0]) as im:
        assert im.size == (64, 64)


def test_e2e_reports_node_errors(comfy_server):
    bad = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "does_not_exist.safetensors"}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    with pytest.raises(comfy_harness.PromptRejected) as e:
        comfy_server.queue(bad)
    assert "node_errors" in e.value.response or "error" in e.value.response


def test_frontend_opens(comfy_server, tmp_path):
    if frontend.chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium missing in CI: run scripts/setup_chromium.sh")
        pytest.skip("/usr/bin/chromium missing (run scripts/setup_chromium.sh)")
    shot = tmp_path / "frontend.png"
    info = frontend.open_frontend(comfy_server.url, shot)
    print(f"frontend ready in {info['seconds']:.1f}s; default graph nodes {info['node_count']}")
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert info["dialogs_open"] == 0
    nodes = frontend.load_workflow(comfy_server.url, {
        "last_node_id": 2, "last_link_id": 0, "links": [], "groups": [], "config": {}, "extra": {}, "version": 0.4,
        "nodes": [
            {"id": 1, "type": "CheckpointLoaderSimple", "pos": [0, 0], "size": [300, 100], "flags": {}, "order": 0,
             "mode": 0, "outputs": [], "properties": {}, "widgets_values": ["hywu_micro_sd15_ip2p.safetensors"]},
            {"id": 2, "type": "HYWUNoSuchNode", "pos": [400, 0], "size": [200, 100], "flags": {}, "order": 1,
             "mode": 0, "properties": {}, "widgets_values": []}]})
    by_id = {n["id"]: n for n in nodes}
    assert by_id["1"]["type"] == "CheckpointLoaderSimple" and not by_id["1"]["missing"]
    assert by_id["2"]["missing"]


def test_object_info_lora_model_nodes(comfy_server):
    """Facts the HY-WU nodes rely on: core SaveLoRA / LoraModelLoader take a LORA_MODEL."""
    info = comfy_server.object_info()
    assert info["SaveLoRA"]["input"]["required"]["lora"][0] == "LORA_MODEL"
    assert info["LoraModelLoader"]["input"]["required"]["lora"][0] == "LORA_MODEL"
    assert "InstructPixToPixConditioning" in info


def test_inprocess_nodes_registry(micro_base):
    mappings = comfy_harness.load_comfy_nodes(micro_base.comfyui)
    for name in ("SaveLoRA", "LoraModelLoader", "InstructPixToPixConditioning", "KSampler"):
        assert name in mappings
