"""ComfyUI's single diffusion-model files as a base's transformer (base.files, trainer/single_files.py). The
full-width one-block files of every DiT family are read too (tests/test_full_width_loaders.py).

The tiny seeded bases' transformers are written in the layouts ComfyUI's diffusion_models/ files have
(FLUX.2 [klein]: BFL keys with fused q/k/v, as tests/comfy_test_nodes/tiny_flux2.py gives ComfyUI; Qwen-Image:
diffusers names), in fp32 and as ComfyUI's scaled fp8. Training with the file instead of the folder's
transformer/ (which the run's folder does not even have) gives the folder run's losses exactly; an fp8 file is
dequantized with its scales; a file of another model, a truncated file and an unsupported component are refused
with messages that name the file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer.single_files import SingleFileError
from trainer.tiny_bases import tiny_config
from trainer.train import run

SETTINGS = {"max_steps": 3, "batch_size": 2, "validate_every": 0, "log_every": 1}


def _transformer_sd(cfg) -> dict:
    from safetensors.torch import load_file

    folder = cfg.base.path + "/transformer"
    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _comfy_layout(family: str, sd: dict) -> dict:
    if family == "flux2_klein":
        import sys

        sys.path.insert(0, str(Path(__file__).parent / "comfy_test_nodes"))
        try:
            from tiny_flux2 import bfl_state_dict
        finally:
            sys.path.pop(0)
        return {"model.diffusion_model." + k: v for k, v in bfl_state_dict(sd).items()}  # as a full checkpoint names them
    return dict(sd)


def _folder_without_transformer(cfg, tmp_path):
    """The base folder's other components (linked) and the transformer's config.json without its weights: the run
    can only read the file (a real base's file needs no folder: its config is the shipped architecture's)."""
    out = tmp_path / "base_without_transformer"
    (out / "transformer").mkdir(parents=True)
    for sub in Path(cfg.base.path).iterdir():
        if sub.name != "transformer":
            (out / sub.name).symlink_to(sub.resolve())
    shutil.copy(Path(cfg.base.path) / "transformer" / "config.json", out / "transformer" / "config.json")
    return out


@pytest.mark.parametrize("family", ["flux2_klein", "qwen_image_edit"])
def test_training_from_the_comfyui_file_equals_the_folder(family, tmp_path):
    folder_cfg = tiny_config(family, tmp_path / "folder", train=SETTINGS)
    file = tmp_path / f"{family}_diffusion_model.safetensors"
    save_file({k: v.contiguous() for k, v in _comfy_layout(family, _transformer_sd(folder_cfg)).items()}, str(file))
    file_cfg = tiny_config(family, tmp_path / "file", train=SETTINGS,
                           base={"path": str(_folder_without_transformer(folder_cfg, tmp_path)), "files": {"transformer": str(file)}})
    a, b = run(folder_cfg, progress=False), run(file_cfg, progress=False)
    assert b["losses"] == a["losses"], (a["losses"], b["losses"])


def test_scaled_fp8_files_are_dequantized_with_their_scales(tmp_path):
    from quantized_files import quantize
    from diffusers import QwenImageTransformer2DModel

    from trainer.single_files import load_component

    cfg = tiny_config("qwen_image_edit", tmp_path / "out")
    sd = {k: v.to(torch.bfloat16) for k, v in _transformer_sd(cfg).items()}
    for fmt, scale_key in (("fp8_scaled", ".weight_scale"), ("fp8_scaled_legacy", ".scale_weight"), ("fp8_e4m3fn", None)):
        tensors, metadata = quantize(sd, fmt)
        path = tmp_path / f"{fmt}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
        m = load_component("qwen_image_edit", "transformer", path, QwenImageTransformer2DModel,
                           Path(cfg.base.path) / "transformer", "qwen_image_edit", torch.float32)
        got = m.state_dict()
        layer = "transformer_blocks.0.attn.to_q"
        w8 = tensors[layer + ".weight"]
        want = w8.float() * (tensors[layer + scale_key].float() if scale_key else 1.0)
        assert w8.dtype == torch.float8_e4m3fn and torch.equal(got[layer + ".weight"], want), fmt
        rel = float((got[layer + ".weight"] - sd[layer + ".weight"].float()).norm() / sd[layer + ".weight"].float().norm())
        assert rel < 0.1, (fmt, rel)  # fp8 rounding, not another weight


def test_wrong_files_are_refused_with_the_file_named(tmp_path):
    from diffusers import QwenImageTransformer2DModel

    from trainer.config import ConfigError
    from trainer.single_files import load_component

    cfg = tiny_config("qwen_image_edit", tmp_path / "out")
    folder = Path(cfg.base.path) / "transformer"
    klein = tiny_config("flux2_klein", tmp_path / "k")
    other = tmp_path / "flux2_klein_file.safetensors"
    save_file({k: v.contiguous() for k, v in _comfy_layout("flux2_klein", _transformer_sd(klein)).items()}, str(other))
    with pytest.raises(SingleFileError, match=r"flux2_klein_file.safetensors does not fit the qwen_image_edit transformer.*missing"):
        load_component("qwen_image_edit", "transformer", other, QwenImageTransformer2DModel, folder, "qwen_image_edit", torch.float32)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(other.read_bytes()[:1000])
    with pytest.raises(SingleFileError, match=r"truncated.safetensors is not a readable safetensors file"):
        load_component("qwen_image_edit", "transformer", truncated, QwenImageTransformer2DModel, folder, "qwen_image_edit", torch.float32)
    with pytest.raises(ConfigError, match=r"base.files.vae: qwen_image_edit reads a ComfyUI single file for transformer"):
        tiny_config("qwen_image_edit", tmp_path / "v", base={"files": {"vae": str(other)}})
    with pytest.raises(ConfigError, match=r"base.files.unet: sd15_ip2p reads a ComfyUI single file for no component"):
        tiny_config("sd15_ip2p", tmp_path / "f", base={"files": {"unet": str(other)}})
