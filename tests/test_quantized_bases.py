"""A HY-WU LoRA on the base stored the ways users' files are (tests/quantized_files.py), in a
real ComfyUI through UNETLoader: bf16, fp8_e4m3fn (an fp8 file, and UNETLoader's weight_dtype on
the bf16 file), fp8 scaled with ComfyUI's quantization metadata, the older scaled-fp8 layout, and
int8 tensor-wise where the ComfyUI under test loads it (0.30; 0.3.75 has no int8 layout).

For each format, runtime and patch mode: the LoRA's effect on the sampler's latent (the latent
with the LoRA minus the same format's plain latent) is compared with its effect on the bf16
base. Runtime mode adds ``B(A x)`` in the compute dtype on top of the quantized layer's own
output, so its effect follows the bf16 one up to what the quantized weights change; patch mode
merges ``W + BA`` and stores the sum back in the file's format (ComfyUI rounds it to fp8 / int8),
which costs the LoRA's effect more. Figures are printed as one JSON line per run.

Runtime mode also equals core "Load LoRA (Bypass, Model Only)" on the saved generated LoRA and
core "Load LoRA Model" with bypass on (newer ComfyUI).
"""
from __future__ import annotations

import itertools
import json

import pytest
import torch

import comfy_harness
import hywu_graphs as g
import quantized_files
from test_runtime_lora import CFG, _latent

EDIT = "make it a snowy winter scene"
SEED = 5
_ids = itertools.count()
# (name, file format, UNETLoader weight_dtype)
VARIANTS = [("bf16", "bf16", "default"), ("fp8_e4m3fn_weight_dtype", "bf16", "fp8_e4m3fn"),
            ("fp8_e4m3fn", "fp8_e4m3fn", "default"), ("fp8_scaled", "fp8_scaled", "default"),
            ("fp8_scaled_legacy", "fp8_scaled_legacy", "default"), ("int8_tensorwise", "int8_tensorwise", "default")]
# Tolerances on the relative L2 error of the LoRA's effect against bf16, set from the figures measured
# on both ComfyUI versions (README, "Quantized bases"; largest: 0.12 runtime, 0.16 patch, for
# UNETLoader's fp8_e4m3fn weight_dtype, which stores every weight in fp8), with room for other CPUs'
# rounding. Runtime mode must not be further from bf16 than patch mode.
RUNTIME_EFFECT_TOL = {"bf16": 1e-3, "fp8_e4m3fn_weight_dtype": 0.2, "fp8_e4m3fn": 0.1, "fp8_scaled": 0.1,
                      "fp8_scaled_legacy": 0.1, "int8_tensorwise": 0.12}
PATCH_EFFECT_TOL = 0.25


def _int8_loads() -> bool:
    return comfy_harness.comfyui_version() >= (0, 28)


def _variants():
    return [v for v in VARIANTS if v[1] != "int8_tensorwise" or _int8_loads()]


@pytest.fixture(scope="module")
def unet_files(hywu_env, micro_base):
    paths = quantized_files.build_quantized_unets(
        micro_base.checkpoint, micro_base.checkpoint.parent.parent / "quantized",
        [f for f in quantized_files.FORMATS if f != "int8_tensorwise" or _int8_loads()])
    d = hywu_env.server.models_dir / "diffusion_models"
    d.mkdir(parents=True, exist_ok=True)
    for p in paths.values():
        if not (d / p.name).exists():
            (d / p.name).symlink_to(p)
    return {fmt: p.name for fmt, p in paths.items()}


def _on_unet(wf: dict, unet_name: str, weight_dtype: str, model_input) -> dict:
    """The graph with the diffusion model from UNETLoader (the checkpoint still gives CLIP and VAE)."""
    wf["20"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": weight_dtype}}
    node, name = model_input
    wf[node]["inputs"][name] = ["20", 0]
    return wf


def _sample(srv, wf) -> torch.Tensor:
    wf["9"]["inputs"]["steps"] = 1
    prefix = f"hywu_quant_{next(_ids)}"
    wf = g.with_saved_latent(wf, prefix)
    wf["11"]["inputs"]["filename_prefix"] = prefix
    entry = srv.run(wf, timeout=300)
    assert entry["status"]["status_str"] == "success"
    return _latent(srv, prefix)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def latents(hywu_env, unet_files):
    """{variant: {"plain", "runtime", "patch"}: latent} for every variant this ComfyUI loads."""
    srv = hywu_env.server
    out = {}
    for name, fmt, dtype in _variants():
        unet = unet_files[fmt]
        out[name] = {
            "plain": _sample(srv, _on_unet(g.plain(instruction=EDIT, seed=SEED, cfg=CFG), unet, dtype, ("9", "model"))),
            "runtime": _sample(srv, _on_unet(g.demo(instruction=EDIT, seed=SEED, cfg=CFG, mode="runtime"), unet, dtype,
                                             ("6", "model"))),
            "patch": _sample(srv, _on_unet(g.demo(instruction=EDIT, seed=SEED, cfg=CFG, mode="patch", batch_index=0),
                                           unet, dtype, ("6", "model"))),
        }
    return out


@pytest.mark.floor
def test_lora_applies_to_every_stored_format(latents):
    ref = latents["bf16"]
    ref_effect = ref["runtime"] - ref["plain"]
    assert float(ref_effect.abs().max()) > 0.1, "the LoRA barely changes the bf16 result: nothing to compare"
    figures = {}
    for name, lat in latents.items():
        runtime_effect, patch_effect = lat["runtime"] - lat["plain"], lat["patch"] - lat["plain"]
        figures[name] = {
            "plain_vs_bf16_plain": round(_rel(lat["plain"], ref["plain"]), 4),
            "runtime_effect_vs_bf16": round(_rel(runtime_effect, ref_effect), 4),
            "patch_effect_vs_bf16": round(_rel(patch_effect, ref_effect), 4),
            "runtime_vs_patch_over_effect": round(float((lat["runtime"] - lat["patch"]).norm() / ref_effect.norm()), 4),
        }
    print(json.dumps({"comfyui": ".".join(map(str, comfy_harness.comfyui_version())), "relative_l2": figures}))
    for name, f in figures.items():
        assert f["runtime_effect_vs_bf16"] <= RUNTIME_EFFECT_TOL[name], (name, f)
        assert f["patch_effect_vs_bf16"] <= PATCH_EFFECT_TOL, (name, f)
        assert f["runtime_effect_vs_bf16"] <= f["patch_effect_vs_bf16"] + 0.005, (name, f)
    assert figures["bf16"]["runtime_vs_patch_over_effect"] <= 1e-3, figures["bf16"]


@pytest.mark.parametrize("fmt", ["bf16", "fp8_scaled"])
def test_runtime_mode_equals_core_bypass_lora(hywu_env, unet_files, fmt):
    """HY-WU runtime mode and core Load LoRA (Bypass, Model Only) on the generated LoRA saved by
    core Save LoRA Weights: the same computation ``W x + s B(A x)``, so the same latent."""
    srv = hywu_env.server
    if "LoraLoaderBypassModelOnly" not in srv.object_info():
        pytest.skip(f"ComfyUI {comfy_harness.comfyui_version()} has no core bypass LoRA (added after 0.3.75)")
    prefix = f"hywu_bypass_{fmt}"
    srv.run(g.lora_only(EDIT, f"loras/{prefix}"), timeout=300)
    saved = sorted((srv.output_dir / "loras").glob(f"{prefix}_*.safetensors"))[-1]
    loras = srv.models_dir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / saved.name).symlink_to(saved)
    unet = unet_files[fmt]
    plain = _sample(srv, _on_unet(g.plain(instruction=EDIT, seed=SEED, cfg=CFG), unet, "default", ("9", "model")))
    ours = _sample(srv, _on_unet(g.demo(instruction=EDIT, seed=SEED, cfg=CFG, mode="runtime"), unet, "default",
                                 ("6", "model")))
    wf = _on_unet(g.plain(instruction=EDIT, seed=SEED, cfg=CFG), unet, "default", ("9", "model"))
    wf["21"] = {"class_type": "LoraLoaderBypassModelOnly",
                "inputs": {"model": ["20", 0], "lora_name": saved.name, "strength_model": 1.0}}
    wf["9"]["inputs"]["model"] = ["21", 0]
    core = _sample(srv, wf)
    # core Load LoRA Model with bypass on, fed by Generate LoRA directly (no file)
    wf = _on_unet(g.with_core_lora_loader(g.demo(instruction=EDIT, seed=SEED, cfg=CFG)), unet, "default",
                  ("6", "model"))
    wf["6"]["inputs"]["bypass"] = True
    core_node = _sample(srv, wf)
    effect = float((ours - plain).abs().max())
    for what, other in (("Load LoRA (Bypass, Model Only) on the saved file", core),
                        ("Load LoRA Model, bypass on", core_node)):
        diff = float((ours - other).abs().max())
        print(f"{fmt}: HY-WU runtime vs core {what}: max |latent diff| {diff:.2e}, LoRA effect {effect:.3g}")
        assert effect > 0.1
        assert diff <= 1e-3 * effect, what
