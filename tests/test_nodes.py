"""HY-WU nodes in a real ComfyUI (0.30 and 0.3.75, --cpu): registration, the LoRA acts, core LoRA nodes
accept it (user errors: tests/test_bad_inputs.py).

Uses the session server (conftest `comfy_server`, `hywu_env`): the micro SD1.5-InstructPix2Pix
checkpoint and the seeded test generators (scripts/build_test_generator.py).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from safetensors.torch import load_file

import hywu_graphs as g

pytestmark = pytest.mark.floor  # also on ComfyUI 0.3.75, the requires-comfyui floor (Makefile)


def _run(srv, wf, timeout=300):
    t0 = time.time()
    entry = srv.run(wf, timeout=timeout)
    return entry, time.time() - t0


def _image(srv, entry):
    paths = srv.output_images(entry)
    assert paths and paths[0].is_file(), entry.get("outputs")
    return g.image_array(paths[0])


def _saved_lora(srv, prefix):
    files = sorted((srv.output_dir / "loras").glob(f"{prefix}_*.safetensors"))
    assert files, f"Save LoRA wrote no file for {prefix}"
    return files[-1]


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
def test_object_info_lists_the_four_nodes(hywu_env):
    info = hywu_env.server.object_info()
    expected = {
        "HYWULoadGenerator": ({"generator_name"}, ["HYWU_GENERATOR"]),
        "HYWUConditionEncode": ({"image", "instruction", "one_edit_per_line", "clip", "vae", "generator",
                                 "clip_vision"}, ["HYWU_COND", "CONDITIONING", "IMAGE"]),
        "HYWUGenerateLoRA": ({"generator", "hywu_cond", "include_shared"}, ["LORA_MODEL"]),
        "HYWUApplyGeneratedLoRA": ({"model", "lora", "strength", "batch_index", "mode"}, ["MODEL"]),
    }
    for node, (inputs, outputs) in expected.items():
        assert node in info, f"{node} not registered; server log:\n{hywu_env.server.log_tail()}"
        d = info[node]
        assert d["category"] == "HY-WU"
        assert d["display_name"].startswith("HY-WU ")
        specs = {**d["input"].get("required", {}), **d["input"].get("optional", {})}
        assert set(specs) == inputs
        assert d["output"] == outputs
        for name, spec in specs.items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
        assert all(d["output_tooltips"]), f"{node} has an output without a tooltip"
    assert info["HYWUConditionEncode"]["input"]["optional"].keys() == {"generator", "clip_vision"}
    assert "vae" in info["HYWUConditionEncode"]["input"]["required"]  # every trained generator reads the VAE
    # core nodes that take our LORA_MODEL
    assert info["SaveLoRA"]["input"]["required"]["lora"][0] == "LORA_MODEL"
    assert info["LoraModelLoader"]["input"]["required"]["lora"][0] == "LORA_MODEL"


def test_generator_list_is_safetensors_only(hywu_env):
    opts = hywu_env.server.object_info("HYWULoadGenerator")["HYWULoadGenerator"]["input"]["required"][
        "generator_name"][1]["options"]
    assert hywu_env.generators["seeded"] in opts
    assert hywu_env.bad_files["not_generator"] in opts  # a .safetensors file, refused when loaded
    assert hywu_env.bad_files["pickle"] not in opts
    assert all(o.endswith(".safetensors") for o in opts)


# ---------------------------------------------------------------------------------------------
# the LoRA acts
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_images(hywu_env):
    srv = hywu_env.server
    plain, t_plain = _run(srv, g.plain(seed=7, prefix="hywu_ref_plain"))
    hywu, t_hywu = _run(srv, g.demo(seed=7, prefix="hywu_ref_hywu"))
    print(f"plain graph {t_plain:.2f}s, HY-WU graph {t_hywu:.2f}s")
    return {"plain": _image(srv, plain), "hywu": _image(srv, hywu)}


def test_strength_zero_equals_plain_workflow(hywu_env, reference_images):
    entry, _ = _run(hywu_env.server, g.demo(seed=7, strength=0.0, prefix="hywu_s0"))
    np.testing.assert_array_equal(_image(hywu_env.server, entry), reference_images["plain"])


def test_nonzero_strength_changes_the_output(reference_images):
    diff = np.abs(reference_images["hywu"] - reference_images["plain"])
    assert diff.max() > 0, "a non-zero generated LoRA at strength 1 left the image unchanged"
    print(f"mean |HY-WU - plain| = {diff.mean():.2f} / 255")


def test_two_instructions_give_two_loras(hywu_env):
    srv = hywu_env.server
    _run(srv, g.lora_only("make it a snowy winter scene", "loras/hywu_instr_a"))
    _run(srv, g.lora_only("turn it into an oil painting", "loras/hywu_instr_b"))
    a, b = load_file(_saved_lora(srv, "hywu_instr_a")), load_file(_saved_lora(srv, "hywu_instr_b"))
    assert a.keys() == b.keys() and any(k.endswith(".lora_up.weight") for k in a)
    assert all(k.startswith("lora_unet_") for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if k.endswith("weight"))
    assert diff > 1e-4, "two different instructions produced the same LoRA"
    # ... and the images differ too
    ia, _ = _run(srv, g.demo(instruction="make it a snowy winter scene", seed=11, prefix="hywu_ia"))
    ib, _ = _run(srv, g.demo(instruction="turn it into an oil painting", seed=11, prefix="hywu_ib"))
    assert np.abs(_image(srv, ia) - _image(srv, ib)).max() > 0


def test_include_shared_off_leaves_out_the_generators_shared_rank(hywu_env):
    """Generate LoRA with include_shared off (the second edit of a chain) writes the generated part
    alone: the same first slots, the shared rank gone, the same alpha / rank; a generator without
    a shared rank writes the same LoRA either way."""
    srv = hywu_env.server

    def saved(generator, include_shared, prefix):
        wf = g.lora_only("make it a snowy winter scene", f"loras/{prefix}", generator=hywu_env.generators[generator])
        wf["5"]["inputs"]["include_shared"] = include_shared
        _run(srv, wf)
        return load_file(_saved_lora(srv, prefix))

    whole, part = saved("seeded_shared", True, "hywu_shared_on"), saved("seeded_shared", False, "hywu_shared_off")
    assert whole.keys() == part.keys()
    downs = [k for k in whole if k.endswith(".lora_down.weight")]
    assert downs
    for down in downs:
        up, alpha = down.replace("lora_down", "lora_up"), down.replace(".lora_down.weight", ".alpha")
        rank = part[down].shape[0]
        assert whole[down].shape[0] == rank + 2  # scripts/build_test_generator.py SHARED_RANK
        assert np.array_equal(part[down].numpy(), whole[down][:rank].numpy())
        assert np.array_equal(part[up].numpy(), whole[up][:, :rank].numpy())
        assert float(part[alpha]) / rank == pytest.approx(float(whole[alpha]) / (rank + 2))
    shared_part = max(float(whole[k.replace("lora_down", "lora_up")][:, -2:].abs().max()) for k in downs)
    assert shared_part > 0, "the test generator's shared rank is zero: nothing was left out"
    plain_on, plain_off = saved("seeded", True, "hywu_plain_on"), saved("seeded", False, "hywu_plain_off")
    assert plain_on.keys() == plain_off.keys()
    assert all(np.array_equal(plain_on[k].numpy(), plain_off[k].numpy()) for k in plain_on)


def test_core_save_lora_and_load_lora_model_apply_it_the_same(hywu_env):
    srv = hywu_env.server
    wf = g.demo(seed=21, prefix="hywu_core_ref")
    ref, _ = _run(srv, wf)
    core, _ = _run(srv, g.with_core_lora_loader(g.demo(seed=21, prefix="hywu_core_loader"),
                                                save_prefix="loras/hywu_core_saved"))
    np.testing.assert_array_equal(_image(srv, core), _image(srv, ref))
    saved = _saved_lora(srv, "hywu_core_saved")
    sd = load_file(saved)
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    # the saved file through core LoraLoaderModelOnly (output/loras is a 'loras' folder)
    static, _ = _run(srv, g.with_static_lora(g.plain(seed=21, prefix="hywu_core_static"), saved.name))
    np.testing.assert_array_equal(_image(srv, static), _image(srv, ref))


def test_batch_of_conditions_gives_n_loras(hywu_env):
    srv = hywu_env.server
    # a 64 px test picture: on the shipped 32 px demo image the seeded pair's two edits round to the same bytes
    wf = g.demo(seed=31, prefix="hywu_batch1", batch_index=1, image=hywu_env.images["other"])
    wf["20"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 2}}
    wf["21"] = {"class_type": "ImageFlip", "inputs": {"image": ["2", 0], "flip_method": "x-axis: vertically"}}
    wf["22"] = {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["21", 0]}}
    wf["4"]["inputs"]["image"] = ["22", 0]
    entry, _ = _run(srv, wf)
    img1 = _image(srv, entry)
    wf0 = dict(wf, **{"6": {**wf["6"], "inputs": {**wf["6"]["inputs"], "batch_index": 0}}})
    wf0["11"] = {**wf["11"], "inputs": {**wf["11"]["inputs"], "filename_prefix": "hywu_batch0"}}
    entry0, _ = _run(srv, wf0)
    assert np.abs(_image(srv, entry0) - img1).max() > 0, "LoRA 0 and LoRA 1 of a two-image batch are the same"
    assert "holds 2 LoRAs" in srv.log_tail(20000)


# user errors: tests/test_bad_inputs.py
# ---------------------------------------------------------------------------------------------
def test_generator_without_encode_link_is_encoded_by_generate(hywu_env):
    """Condition Encode without the optional generator input: Generate LoRA encodes for its spec."""
    srv = hywu_env.server
    wf = g.demo(seed=7, prefix="hywu_nogenlink")
    del wf["4"]["inputs"]["generator"]
    entry, _ = _run(srv, wf)
    ref, _ = _run(srv, g.demo(seed=7, prefix="hywu_ref_hywu2"))
    np.testing.assert_array_equal(_image(srv, entry), _image(srv, ref))
