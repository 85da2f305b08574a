"""Runtime (per-sample) LoRAs in a real ComfyUI (0.30 and 0.3.75, --cpu), through POST /prompt:
runtime mode equals patch mode for one LoRA, N edits in one sampler batch equal N separate
one-edit runs (CFG > 1, and with an area cond that ComfyUI runs in separate model calls),
strength 0 is the unpatched model, the input MODEL is not changed, and a model from core Load
LoRA Model carries a runtime LoRA. (User errors of runtime mode: tests/test_bad_inputs.py.)

Latents are compared (core Save Latent writes them as safetensors): runtime (W x + s B(A x))
and patch ((W + s BA) x) mode, and a batch against single runs, round differently in float32,
so they agree within a tolerance set far below the LoRA's own effect; images may differ by a
level or two for the same reason.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hywu_graphs as g

pytestmark = pytest.mark.floor  # also on ComfyUI 0.3.75, the requires-comfyui floor (Makefile)

EDITS = ["make it a snowy winter scene", "turn it into an oil painting", "make it night"]
CFG = 7.5  # > 1: ComfyUI batches cond and uncond into one model call
STEPS = 1  # one model call per run keeps the file fast; the LoRA acts in it
_ids = itertools.count()


def _run(srv, wf):
    entry = srv.run(wf, timeout=300)
    assert entry["status"]["status_str"] == "success"
    return entry


def _latent(srv, prefix) -> torch.Tensor:
    files = sorted((srv.output_dir / "latents").glob(f"{prefix}_*.latent"))
    assert files, f"Save Latent wrote nothing for {prefix}"
    return load_file(str(files[-1]))["latent_tensor"].float()


def _sample(srv, wf, name):
    """Run ``wf`` with its latent saved; returns (latent batch, images)."""
    wf["9"]["inputs"]["steps"] = STEPS
    prefix = f"hywu_rt_{name}_{next(_ids)}"
    wf = g.with_saved_latent(wf, prefix)
    wf["11"]["inputs"]["filename_prefix"] = prefix
    entry = _run(srv, wf)
    return _latent(srv, prefix), [g.image_array(p) for p in srv.output_images(entry)]


def _assert_close(a, b, reference_change, what):
    """a == b within 0.1% of how much the LoRA itself changes the latent."""
    diff = float((a - b).abs().max())
    change = float(reference_change)
    assert change > 0.1, f"{what}: the LoRA barely changes the result ({change}), the comparison would prove nothing"
    assert diff <= 1e-3 * change, f"{what}: max |difference| {diff:.3g} vs LoRA effect {change:.3g}"
    return diff


@pytest.fixture(scope="module")
def plain_latent(hywu_env):
    """(latent, images) of the plain model (no HY-WU) with EDITS[0]: the reference of every test."""
    return _sample(hywu_env.server, g.plain(instruction=EDITS[0], seed=5, cfg=CFG), "plain")


def test_runtime_mode_equals_patch_mode_for_one_lora(hywu_env, plain_latent):
    srv = hywu_env.server
    runtime, rt_img = _sample(srv, g.demo(instruction=EDITS[0], seed=5, cfg=CFG, mode="runtime"), "runtime")
    patch, pa_img = _sample(srv, g.demo(instruction=EDITS[0], seed=5, cfg=CFG, mode="patch", batch_index=0), "patch")
    effect = (patch - plain_latent[0]).abs().max()
    diff = _assert_close(runtime, patch, effect, "runtime vs patch")
    assert np.abs(rt_img[0] - pa_img[0]).max() <= 2
    print(f"runtime vs patch: max |latent diff| {diff:.2e}, LoRA effect {float(effect):.3g}")


def test_n_edits_in_one_batch_equal_separate_runs(hywu_env, plain_latent):
    srv = hywu_env.server
    batched, images = _sample(srv, g.demo(instruction=EDITS, seed=5, cfg=CFG), "batched")
    assert batched.shape[0] == len(EDITS) and len(images) == len(EDITS)
    for i, edit in enumerate(EDITS):
        single, single_img = _sample(srv, g.as_sample_of_batch(g.demo(instruction=edit, seed=5, cfg=CFG), i, len(EDITS)),
                                     f"single{i}")
        others = [j for j in range(len(EDITS)) if j != i]
        # the batch's other samples (other LoRAs, other noise) are far from this run; this one is equal
        spread = min(float((batched[j] - single[0]).abs().max()) for j in others)
        diff = _assert_close(batched[i], single[0], spread, f"edit {i} batched vs alone")
        assert np.abs(images[i] - single_img[0]).max() <= 2
        print(f"edit {i}: batched vs alone {diff:.2e}, nearest other sample {spread:.3g}")
    # each sample has its own LoRA: same noise + same LoRA would reproduce sample 0's alone-run; the
    # plain model at sample 0 differs from the LoRA'd sample by the LoRA's effect
    assert float((batched[0] - plain_latent[0]).abs().max()) > 0.1


def test_area_cond_runs_in_separate_model_calls_and_still_matches(hywu_env):
    """An area cond cannot be concatenated with the uncond: ComfyUI runs them as two model calls
    (cond_or_uncond [0] and [1]); each must still map sample j to LoRA j."""
    srv = hywu_env.server

    def with_area(wf):
        wf["20"] = {"class_type": "ConditioningSetAreaPercentage",
                    "inputs": {"conditioning": ["8", 0], "width": 0.5, "height": 1.0, "x": 0.0, "y": 0.0, "strength": 1.0}}
        wf["9"]["inputs"]["positive"] = ["20", 0]
        return wf

    edits = EDITS[:2]
    batched, _ = _sample(srv, with_area(g.demo(instruction=edits, seed=9, cfg=CFG)), "area_batched")
    # the second edit: a mapping that gave every sample LoRA 0 (or ignored the chunks) would fail here
    single, _ = _sample(srv, with_area(g.as_sample_of_batch(g.demo(instruction=edits[1], seed=9, cfg=CFG), 1, 2)),
                        "area_single1")
    _assert_close(batched[1], single[0], (batched[0] - single[0]).abs().max(), "area edit 1")


@pytest.mark.parametrize("mode", ["runtime", "patch"])
def test_strength_zero_is_the_unpatched_model(hywu_env, plain_latent, mode):
    srv = hywu_env.server
    latent, _ = _sample(srv, g.demo(instruction=EDITS[0], seed=5, cfg=CFG, strength=0.0, mode=mode, batch_index=0),
                        f"s0_{mode}")
    assert torch.equal(latent, plain_latent[0])


def test_model_input_is_not_mutated(hywu_env, plain_latent):
    """In one prompt, the plain model samples after the runtime-LoRA model, with the patched clone
    still loaded (the order comes from a Latent Blend at factor 1, which passes its first input
    through exactly): it gives exactly the plain result sampled before."""
    srv = hywu_env.server
    wf = g.demo(instruction=EDITS, seed=5, cfg=CFG, steps=STEPS)  # three LoRAs, one per sample, on the clone
    wf["29"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["9", 0], "batch_index": 0, "length": 1}}
    wf["30"] = {"class_type": "LatentBlend", "inputs": {"samples1": ["31", 2], "samples2": ["29", 0], "blend_factor": 1.0}}
    wf["31"] = {"class_type": "InstructPixToPixConditioning",
                "inputs": {"positive": ["32", 0], "negative": ["7", 0], "vae": ["1", 2], "pixels": ["2", 0]}}
    wf["32"] = {"class_type": "CLIPTextEncode", "inputs": {"text": EDITS[0], "clip": ["1", 1]}}
    wf["33"] = {**wf["9"], "inputs": {**wf["9"]["inputs"], "model": ["1", 0], "positive": ["31", 0],
                                      "negative": ["31", 1], "latent_image": ["30", 0]}}
    prefix = f"hywu_rt_after_{next(_ids)}"
    wf["34"] = {"class_type": "SaveLatent", "inputs": {"samples": ["33", 0], "filename_prefix": f"latents/{prefix}"}}
    _run(srv, wf)
    assert torch.equal(_latent(srv, prefix), plain_latent[0]), "the plain MODEL changed after a runtime-LoRA run"


def _with_second_edit(wf, instruction):
    """The demo graph plus a second Condition Encode -> Generate LoRA on the same source (node 41's LoRA)."""
    wf["40"] = {"class_type": "HYWUConditionEncode",
                "inputs": {"image": ["2", 0], "instruction": instruction, "one_edit_per_line": False,
                           "clip": ["1", 1], "generator": ["3", 0], "vae": ["1", 2]}}
    wf["41"] = {"class_type": "HYWUGenerateLoRA", "inputs": {"generator": ["3", 0], "hywu_cond": ["40", 0]}}
    return wf


def test_runtime_lora_on_a_model_from_core_load_lora_model(hywu_env, plain_latent):
    """Core Load LoRA Model (weight patches) first, then HY-WU Apply: runtime and patch mode agree."""
    srv = hywu_env.server

    def stacked(mode):
        wf = _with_second_edit(g.demo(instruction=EDITS[0], seed=5, cfg=CFG, mode=mode, batch_index=0), EDITS[2])
        wf["42"] = {"class_type": "LoraModelLoader", "inputs": {"model": ["1", 0], "lora": ["41", 0],
                                                                "strength_model": 1.0, "bypass": False}}
        wf["6"]["inputs"]["model"] = ["42", 0]
        return wf

    runtime, _ = _sample(srv, stacked("runtime"), "stack_runtime")
    patch, _ = _sample(srv, stacked("patch"), "stack_patch")
    _assert_close(runtime, patch, (patch - plain_latent[0]).abs().max(), "runtime on a Load LoRA Model output")


def test_two_edits_chained_add_up(hywu_env):
    """Two HY-WU edits in a row (Condition Encode -> Generate LoRA -> Apply twice, the second Apply
    on the first one's MODEL): runtime mode on runtime mode equals patch mode on patch mode, the
    sum of both LoRAs' updates (how bench/compose.py sums an instruction's two parts)."""
    srv = hywu_env.server

    def chained(mode):
        wf = _with_second_edit(g.demo(instruction=EDITS[0], seed=5, cfg=CFG, mode=mode, batch_index=0), EDITS[2])
        wf["42"] = {"class_type": "HYWUApplyGeneratedLoRA", "inputs": {"model": ["6", 0], "lora": ["41", 0],
                                                                       "strength": 1.0, "batch_index": 0, "mode": mode}}
        wf["9"]["inputs"]["model"] = ["42", 0]
        return wf

    first_only, _ = _sample(srv, g.demo(instruction=EDITS[0], seed=5, cfg=CFG, mode="patch", batch_index=0), "first")
    runtime, _ = _sample(srv, chained("runtime"), "chain_runtime")
    patch, _ = _sample(srv, chained("patch"), "chain_patch")
    # the second edit changes the result, and both modes agree on it
    _assert_close(runtime, patch, (patch - first_only).abs().max(), "two chained edits, runtime vs patch")
