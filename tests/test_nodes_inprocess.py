"""HY-WU nodes called in-process on ComfyUI's own objects (no server): the cases a graph of core
nodes cannot produce (a one-channel IMAGE), the feature extraction against the documented
recipe, the models/hywu registration, progress and interruption, and the LoRA patches."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import comfy_harness


@pytest.fixture(scope="module")
def comfy_env(micro_base):
    comfy_harness.import_comfy(micro_base.comfyui, extra_modules=(
        "comfy.sd", "comfy.utils", "comfy.model_management", "folder_paths", "comfy.lora", "comfy_api.latest"))
    import comfy.sd

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import build_test_generator as btg
    finally:
        sys.path.pop(0)
    gens = btg.build_test_generators(base_dir=micro_base.diffusers_dir)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(micro_base.checkpoint), output_vae=True,
                                                                output_clip=True)
    from hywu_nodes.nodes.load_generator import load_generator_handle

    return {"model": model, "clip": clip, "vae": vae, "gens": gens,
            "gen": load_generator_handle(str(gens["seeded"]))}


def _images(b=1, h=64, w=64, c=3, seed=0):
    return torch.rand(b, h, w, c, generator=torch.Generator().manual_seed(seed))


def test_model_folder_keeps_user_paths(comfy_env, tmp_path):
    import folder_paths

    from hywu_nodes.nodes.common import generator_files, register_model_folder

    saved = folder_paths.folder_names_and_paths.get("hywu")
    try:
        folder_paths.folder_names_and_paths.pop("hywu", None)
        user = tmp_path / "my_generators"
        user.mkdir()
        (user / "a.safetensors").write_bytes(b"x")
        (user / "b.pt").write_bytes(b"x")
        folder_paths.add_model_folder_path("hywu", str(user))  # what extra_model_paths.yaml does
        paths = register_model_folder()
        assert paths[0] == str(user) and paths[1].endswith("hywu")
        assert folder_paths.folder_names_and_paths["hywu"][1] == {".safetensors"}
        assert generator_files() == ["a.safetensors"]
    finally:
        if saved is not None:
            folder_paths.folder_names_and_paths["hywu"] = saved
        folder_paths.filename_list_cache.pop("hywu", None)


@pytest.mark.parametrize("channels,needle", [(1, "one channel"), (4, "alpha channel"), (2, "2 channels")])
def test_condition_encode_rejects_non_rgb(comfy_env, channels, needle):
    from hywu_nodes.nodes.encode import HYWUConditionEncode
    from hywu_nodes.nodes.types import HYWUError

    with pytest.raises(HYWUError, match=needle):
        HYWUConditionEncode.execute(_images(c=channels), "make it snowy", comfy_env["clip"],
                                    generator=comfy_env["gen"], vae=comfy_env["vae"])


def test_encode_condition_follows_the_recipe(comfy_env):
    """text = CLIP cond (77x768); image = square_resize -> vae.encode -> SD15 process_in -> patchify."""
    import comfy.latent_formats

    from hywu_nodes.core import patchify_latent, square_resize
    from hywu_nodes.nodes.encode import encode_condition

    clip, vae, spec = comfy_env["clip"], comfy_env["vae"], comfy_env["gen"].condition_spec
    imgs = _images(b=2, h=72, w=96)
    cond, conditioning = encode_condition(spec, imgs, "make it snowy", clip, vae=vae,
                                          model_latent_format=comfy.latent_formats.SD15)
    ref_text, ref_pooled = clip.encode_from_tokens(clip.tokenize("make it snowy"), return_pooled=True)
    assert cond.tokens["text"].shape == (2, 77, 768)
    torch.testing.assert_close(cond.tokens["text"][1:], ref_text.float())
    torch.testing.assert_close(conditioning[0][0], ref_text)
    torch.testing.assert_close(conditioning[0][1]["pooled_output"], ref_pooled)
    latent = vae.encode(square_resize(imgs.movedim(-1, 1), 64).clamp(0, 1).movedim(1, -1)) * 0.18215
    torch.testing.assert_close(cond.tokens["image"], patchify_latent(latent.float(), 2))
    assert cond.tokens["image"].shape == (2, 16, 16)
    # the model's own latent format gives the same as the family default
    cond2, _ = encode_condition(spec, imgs, "make it snowy", clip, vae=vae,
                                model_latent_format=comfy_env["model"].model.latent_format)
    torch.testing.assert_close(cond2.tokens["image"], cond.tokens["image"])


def test_long_instruction_is_truncated_with_warning(comfy_env, caplog):
    from hywu_nodes.nodes.encode import encode_condition

    long = " ".join(["snow"] * 120)
    cond, conditioning = encode_condition(comfy_env["gen"].condition_spec, _images(), long, comfy_env["clip"],
                                          vae=comfy_env["vae"])
    assert conditioning[0][0].shape[1] == 154  # the sampler gets all of it
    assert cond.tokens["text"].shape[1] == 77
    assert "truncated" in caplog.text


def test_generate_progress_interrupt_and_offload(comfy_env):
    import comfy.model_management as mm
    import comfy.utils

    from hywu_nodes.nodes.encode import HYWUConditionEncode
    from hywu_nodes.nodes.generate import generate_loras

    gen = comfy_env["gen"]
    enc, *_ = HYWUConditionEncode.execute(_images(b=2), "make it snowy", comfy_env["clip"], generator=gen,
                                         vae=comfy_env["vae"]).args
    calls = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        lora = generate_loras(gen, enc)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    n_blocks = gen.info.config.n_blocks
    assert calls[-1] == (2 * n_blocks, 2 * n_blocks)
    assert len(lora.batch) == 2 and lora.base_family == "sd15_ip2p"
    assert all(torch.equal(lora[k], lora.batch[0][k]) for k in lora)
    assert not any(m.model is gen.patcher for m in mm.current_loaded_models), "generator still loaded after use"
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            generate_loras(gen, enc)
    finally:
        mm.interrupt_current_processing(False)


def test_apply_patches_a_clone_like_load_lora_for_models(comfy_env, caplog):
    import comfy.sd

    from hywu_nodes.nodes.apply import HYWUApplyGeneratedLoRA, apply_lora
    from hywu_nodes.nodes.encode import HYWUConditionEncode
    from hywu_nodes.nodes.generate import generate_loras

    model = comfy_env["model"]
    enc, *_ = HYWUConditionEncode.execute(_images(), "make it snowy", comfy_env["clip"], generator=comfy_env["gen"],
                                         vae=comfy_env["vae"]).args
    lora = generate_loras(comfy_env["gen"], enc)
    before = set(model.patches)
    patched, stats = apply_lora(model, lora, 0.5)
    assert patched is not model and set(model.patches) == before, "the input MODEL was changed"
    assert stats["matched"] == stats["modules"] == len(comfy_env["gen"].info.target_spec.targets)
    assert stats["unmatched"] == 0 and stats["patched"] == stats["matched"]
    core, _ = comfy.sd.load_lora_for_models(model, None, dict(lora), 0.5, 0)
    assert set(core.patches) == set(patched.patches)
    for k in core.patches:
        a, b = core.patches[k][0], patched.patches[k][0]
        assert a[0] == b[0] == 0.5
    assert HYWUApplyGeneratedLoRA.execute(model, lora, 0.0).args[0] is model  # strength 0: unchanged
    # an unmatched key is reported in the log, matched ones still applied
    extra = dict(lora)  # a plain LORA_MODEL dict (e.g. from another node)
    extra["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 4)
    extra["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 4)
    caplog.clear()
    _, stats = apply_lora(model, extra, 1.0)
    assert stats["unmatched"] == 1 and "lora_unet_not_a_layer" in caplog.text


def test_generator_dtype_suits_device(comfy_env):
    from hywu_nodes.nodes.common import generator_dtype

    assert generator_dtype(torch.device("cpu")) == torch.float32
    assert comfy_env["gen"].dtype == (torch.float32 if not torch.cuda.is_available() else comfy_env["gen"].dtype)
