"""Full-width one-block FLUX.1 Kontext, Qwen-Image and FLUX.2 [klein] 4B files through ComfyUI's real UNETLoader
(issue 15 item 1; klein on a ComfyUI that runs klein only): model detection and the pack's key map at the real widths, which the tiny test models
(tests/comfy_test_nodes/tiny_dit.py) cannot show because ComfyUI's detection fixes those widths.

The files are seeded and cached under models/diffusion_models by scripts/build_full_width_dits.py
(built on first use, about 20 s here; FLUX 545.5M params / 1.09 GB bf16, Qwen 380.4M / 0.76 GB, klein 4B
563.1M / 1.13 GB).
In-process: ``nodes.UNETLoader`` detects each file as its supported model, and every target name of
the family's target spec (built from the matching diffusers transformer on the meta device) is in
ComfyUI's key map with the shape of its weight (or fused slice); HY-WU Apply matches all of them in
runtime and patch mode. In a real server: UNETLoader -> HY-WU Apply Generated LoRA -> KSampler
(1 step, 16x16 latent) -> SaveLatent; runtime mode equals patch mode and differs from strength 0."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import comfy_harness

pytestmark = pytest.mark.floor  # also on ComfyUI 0.3.75, the requires-comfyui floor (Makefile)

REPO = Path(__file__).resolve().parents[1]
NODES_DIR = Path(__file__).resolve().parent / "comfy_full_width_nodes"
RANK = 2

FAMILIES = {
    "flux_kontext": dict(kind="flux_kontext", config="Flux", targets=17, fused=10, runtime_layers=10,
                         text_width=4096, pooled=768),
    "qwen_image_edit": dict(kind="qwen_image", config="QwenImage", targets=12, fused=0, runtime_layers=12,
                            text_width=3584, pooled=0),
    # klein 4B's widths; ComfyUI 0.3.75 detects FLUX.2 [dev] only (48 heads fixed), so this one needs 0.30
    "flux2_klein": dict(kind="flux2_klein", config="Flux2", targets=14, fused=6, runtime_layers=10,
                        text_width=7680, pooled=0, latent="EmptyFlux2LatentImage"),
}


def _families():
    """The families the ComfyUI under test can load (klein: one whose text encoders include klein's)."""
    import comfy.text_encoders.flux

    return [f for f in FAMILIES if f != "flux2_klein" or hasattr(comfy.text_encoders.flux, "KleinTokenizer")]


def _skip_without(family):
    comfy_harness.import_comfy(extra_modules=("comfy.text_encoders.flux",))
    if family not in _families():
        pytest.skip(f"{family}: the ComfyUI under test ({comfy_harness.comfyui_version()}) cannot load it")


def _builder():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_full_width_dits
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return build_full_width_dits


@pytest.fixture(scope="module")
def full_width_files():
    return _builder().ensure_full_width_dits(comfyui_path=comfy_harness.comfyui_path())


def _target_spec(family):
    """The family's target spec from the diffusers transformer of the file's architecture (meta device)."""
    import diffusers

    from hywu_nodes.core.targets import build_target_spec

    cls = {"flux_kontext": diffusers.FluxTransformer2DModel, "qwen_image_edit": diffusers.QwenImageTransformer2DModel,
           "flux2_klein": diffusers.Flux2Transformer2DModel}[family]
    with torch.device("meta"):
        model = cls(**_builder().DIFFUSERS_CONFIGS[FAMILIES[family]["kind"]])
    return build_target_spec(model, family)


def _lora_file(family, spec, path, seed=0):
    """A LoRA for every target in the pack's own layout (core.lora_format.to_lora_state_dict)."""
    from safetensors.torch import save_file

    from hywu_nodes.core.functional_lora import GeneratedLoRA
    from hywu_nodes.core.lora_format import to_lora_state_dict

    g = torch.Generator().manual_seed(seed)
    weights = {t.name: (torch.randn(1, RANK, t.d_in, generator=g) * t.d_in ** -0.5,
                        torch.randn(1, t.d_out, RANK, generator=g) * 0.5) for t in spec.targets}
    sd = to_lora_state_dict(GeneratedLoRA(weights, 1.0), family)
    save_file(sd, str(path))
    return sd


def test_cached_files_are_reused_only_when_their_record_matches(full_width_files, tmp_path):
    from safetensors.torch import save_file

    b = _builder()
    for kind, path in full_width_files.items():
        assert b.cached_ok(Path(path), kind, 0) and not b.cached_ok(Path(path), kind, 1)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"hywu_full_width": "{}"})
    assert not b.cached_ok(other, "flux_kontext", 0)
    with open(full_width_files["qwen_image"], "rb") as f:  # a cut-off copy
        (tmp_path / "cut.safetensors").write_bytes(f.read(4096))
    assert not b.cached_ok(tmp_path / "cut.safetensors", "qwen_image", 0)
    a, c = b.seeded_tensor("x.weight", (300, 7), 0, chunk_elems=70), b.seeded_tensor("x.weight", (300, 7), 0, chunk_elems=70)
    assert torch.equal(a, c) and a.dtype == torch.bfloat16 and not torch.equal(a, b.seeded_tensor("y.weight", (300, 7), 0))
    assert 0.3 < float(a.float().std() * 7 ** 0.5) < 3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unetloader_detects_the_file_and_the_key_map_covers_every_target(family, full_width_files, tmp_path):
    _skip_without(family)
    comfy_harness.import_comfy(extra_modules=("comfy.sd", "comfy.utils", "comfy.model_management", "comfy.lora",
                                              "folder_paths", "nodes", "comfy_api.latest"))
    import comfy.lora
    import comfy.supported_models
    import folder_paths
    import nodes

    from hywu_nodes.core.lora_format import lora_module_key
    from hywu_nodes.nodes.apply import apply_lora, apply_runtime_lora
    from hywu_nodes.nodes.types import HYWULoRA

    fam = FAMILIES[family]
    path = Path(full_width_files[fam["kind"]])
    folder_paths.add_model_folder_path("diffusion_models", str(path.parent), is_default=True)
    model = nodes.UNETLoader().load_unet(path.name, "default")[0]  # the real loader node
    config = model.model.model_config
    assert type(config) is getattr(comfy.supported_models, fam["config"])  # not FluxSchnell / FluxInpaint
    unet = config.unet_config
    if family == "flux_kontext":
        assert (unet["hidden_size"], unet["num_heads"], unet["depth"], unet["depth_single_blocks"]) == (3072, 24, 1, 1)
        assert unet["guidance_embed"] is True and unet["context_in_dim"] == 4096 and unet["vec_in_dim"] == 768
    elif family == "flux2_klein":  # heads from the width (128 each), no guidance embedding, Qwen3-4B's text width
        assert (unet["image_model"], unet["hidden_size"], unet["num_heads"], unet["depth"], unet["depth_single_blocks"]) \
            == ("flux2", 3072, 24, 1, 1)
        assert unet["guidance_embed"] is False and unet["context_in_dim"] == 7680 and unet["in_channels"] == 128
    else:  # detection reads depth and input channels; widths are the model's fixed 3072 / text 3584
        assert (unet["image_model"], unet["in_channels"], unet["num_layers"]) == ("qwen_image", 64, 1)
        assert tuple(model.model.diffusion_model.txt_in.weight.shape) == (3072, 3584)

    spec = _target_spec(family)
    assert len(spec.targets) == fam["targets"]
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = model.model.state_dict()
    fused = 0
    for t in spec.targets:
        key = lora_module_key(family, t.name)
        assert key in key_map, f"{key} has no ComfyUI weight"
        target = key_map[key]
        weight_key, offset = (target, None) if isinstance(target, str) else target[:2]
        w = sd[weight_key]
        rows = w.shape[0] if offset is None else offset[2]
        assert (rows, w.shape[1]) == (t.d_out, t.d_in), (key, weight_key, offset, tuple(w.shape))
        fused += offset is not None
    assert fused == fam["fused"]
    if family == "flux2_klein":  # its single block's fused projections are whole ComfyUI weights
        single = {t.name.rsplit(".", 1)[-1]: key_map[lora_module_key(family, t.name)] for t in spec.targets
                  if t.name.startswith("single_")}
        assert single == {"to_qkv_mlp_proj": "diffusion_model.single_blocks.0.linear1.weight",
                          "to_out": "diffusion_model.single_blocks.0.linear2.weight"}
    if family == "flux_kontext":  # the single block's fused linear1 (q, k, v, mlp) and linear2
        single = {t.name.rsplit(".", 1)[-1]: key_map[lora_module_key(family, t.name)] for t in spec.targets
                  if t.name.startswith("single_")}
        assert single["proj_mlp"][0] == single["to_q"][0] == "diffusion_model.single_blocks.0.linear1.weight"
        assert single["proj_out"] == "diffusion_model.single_blocks.0.linear2.weight"

    lora = HYWULoRA(_lora_file(family, spec, tmp_path / "lora.safetensors"), base_family=family)
    _, stats = apply_runtime_lora(model, lora, [lora], 1.0)
    assert (stats["matched"], stats["unmatched"], stats["weight_patched"]) == (fam["targets"], 0, 0)
    assert stats["runtime_layers"] == fam["runtime_layers"]
    _, stats = apply_lora(model, lora, 1.0)
    assert (stats["matched"], stats["patched"]) == (fam["targets"], fam["targets"])


def _graph(family, unet_name, lora_path, strength, mode):
    fam = FAMILIES[family]
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "HYWUTestLoRAFile", "inputs": {"path": str(lora_path)}},
        "3": {"class_type": "HYWUApplyGeneratedLoRA", "inputs": {"model": ["1", 0], "lora": ["2", 0],
                                                                  "strength": strength, "batch_index": -1, "mode": mode}},
        "4": {"class_type": "HYWUTestConditioning", "inputs": {"tokens": 8, "width": fam["text_width"],
                                                                "pooled": fam["pooled"], "seed": 0}},
        "5": {"class_type": fam.get("latent", "EmptySD3LatentImage"), "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["4", 0],
                                                   "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0],
                                                     "filename_prefix": f"latents/{family}_{mode}_{strength:g}"}},
    }


def test_real_server_unetloader_apply_and_sample(full_width_files, tmp_path):
    """UNETLoader -> HY-WU Apply Generated LoRA -> KSampler in a real server, every family the ComfyUI loads:
    runtime mode equals patch mode, and the LoRA changes the sample (against strength 0)."""
    import requests
    from safetensors.torch import load_file

    comfy_harness.import_comfy(extra_modules=("comfy.text_encoders.flux",))
    files = {f: Path(full_width_files[FAMILIES[f]["kind"]]) for f in _families()}
    with comfy_harness.ComfyServer(extra_models={"diffusion_models": list(files.values())},
                                   custom_nodes=[NODES_DIR]) as srv:
        names = srv.object_info("UNETLoader")["UNETLoader"]["input"]["required"]["unet_name"][0]
        assert {p.name for p in files.values()} <= set(names)
        for family, path in files.items():
            lora_path = tmp_path / f"{family}_lora.safetensors"
            _lora_file(family, _target_spec(family), lora_path, seed=1)
            out = {}
            for strength, mode in ((0.0, "runtime"), (1.0, "runtime"), (1.0, "patch")):
                entry = srv.run(_graph(family, path.name, lora_path, strength, mode), timeout=600)
                saved = [f for node in entry["outputs"].values() for f in node.get("latents", [])]
                assert len(saved) == 1, entry["outputs"]
                latent = srv.output_dir / saved[0]["subfolder"] / saved[0]["filename"]
                out[(strength, mode)] = load_file(str(latent))["latent_tensor"]
            base, runtime, patch = out[(0.0, "runtime")], out[(1.0, "runtime")], out[(1.0, "patch")]
            assert torch.isfinite(runtime).all() and runtime.shape == base.shape
            effect = float((patch - base).abs().max())
            assert effect > 1e-2, f"{family}: the LoRA does not change the sample ({effect})"
            # measured here: 6.9e-6 against an effect of 6.9 (FLUX), 4.3e-6 against 2.4 (Qwen)
            assert float((runtime - patch).abs().max()) <= 1e-5 * effect, family
            requests.post(srv.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=30)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_trainer_reads_the_file_as_its_transformer(family, full_width_files, tmp_path):
    """base.files (trainer/single_files.py) on the full-width file: its keys converted (BFL names, fused q/k/v
    split) and loaded strictly into the diffusers transformer of the file's architecture, at the real widths."""
    import json

    import diffusers
    from safetensors import safe_open

    from trainer.single_files import load_component

    _skip_without(family)
    kind = FAMILIES[family]["kind"]
    cls = {"flux_kontext": diffusers.FluxTransformer2DModel, "qwen_image_edit": diffusers.QwenImageTransformer2DModel,
           "flux2_klein": diffusers.Flux2Transformer2DModel}[family]
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **_builder().DIFFUSERS_CONFIGS[kind]}))
    path = full_width_files[kind]
    model = load_component(family, "transformer", path, cls, tmp_path, family, torch.bfloat16)
    sd = model.state_dict()
    assert not any(v.is_meta for v in sd.values())
    with safe_open(str(path), "pt") as f:  # one fused weight split back: q is the first third of the file's qkv
        keys = set(f.keys())
        if family == "qwen_image_edit":
            name = next(k for k in keys if k.endswith("attn.to_q.weight"))
            assert torch.equal(sd[name.split("diffusion_model.")[-1]], f.get_tensor(name).to(torch.bfloat16))
        else:
            qkv = f.get_tensor(next(k for k in keys if k.endswith("double_blocks.0.img_attn.qkv.weight"))).to(torch.bfloat16)
            assert torch.equal(sd["transformer_blocks.0.attn.to_q.weight"], qkv[: qkv.shape[0] // 3])
    print(f"{family}: {sum(v.numel() for v in sd.values()) / 1e6:.1f}M parameters read from {Path(path).name}")
