"""The same graphs on the two ComfyUI versions `make test` runs (the 0.3.75 floor and the newest
tree, tests/comfy_harness.py) give the same images: the micro SD1.5 graphs (demo in runtime and
in patch mode, strength 0, one edit per line, two chained edits, core Load LoRA Model), all on
CPU in float32, where nothing in the two versions' arithmetic differs (measured: byte-identical
PNGs). Runs in the main pass (newest tree) with a second server on the floor; it has nothing to
compare where both are the same checkout.

(FLUX.1 Kontext and Qwen-Image-Edit: their end-to-end tests compare the template's image with the
trainer's own edit at >= 40 dB on each version; tests/test_family_*.py.)
"""
from __future__ import annotations

import numpy as np
import pytest

import comfy_harness
import hywu_graphs as g

GRAPHS = {
    "runtime": lambda: g.demo(instruction="make it a snowy winter scene", seed=3, cfg=7.5),
    "patch": lambda: g.demo(instruction="make it a snowy winter scene", seed=3, cfg=7.5, mode="patch", batch_index=0),
    "strength_0": lambda: g.demo(instruction="make it a snowy winter scene", seed=3, strength=0.0),
    "one_edit_per_line": lambda: g.demo(instruction=["make it night", "turn it into an oil painting"], seed=3),
    "two_chained_edits": lambda: g.with_test_files(g.load_api("hywu_demo_two_edits")),
    "core_load_lora_model": lambda: g.with_core_lora_loader(g.demo(instruction="make it night", seed=3)),
}


@pytest.fixture(scope="module")
def other_server(hywu_env, micro_base):
    here, floor = comfy_harness.comfyui_path(), comfy_harness.floor_comfyui_path()
    other = comfy_harness.newest_comfyui_path() if here == floor else floor
    if other == here:
        pytest.skip("one ComfyUI checkout only: nothing to compare it with")
    gens = sorted(p.resolve() for p in (hywu_env.server.models_dir / "hywu").glob("hywu_micro_*.safetensors"))
    with comfy_harness.ComfyServer(comfy_path=other, checkpoints=[micro_base.checkpoint],
                                   extra_models={"hywu": gens}) as srv:
        yield srv


def _images(srv, wf, prefix):
    for node in wf.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = prefix
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    entry = srv.run(wf, timeout=300)
    return [g.image_array(p) for p in srv.output_images(entry)]


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_both_versions_give_the_same_images(hywu_env, other_server, graph):
    here = _images(hywu_env.server, GRAPHS[graph](), f"hywu_versions_{graph}")
    there = _images(other_server, GRAPHS[graph](), f"hywu_versions_{graph}")
    versions = [".".join(map(str, comfy_harness.comfyui_version(s.comfy_path))) for s in (hywu_env.server, other_server)]
    assert here and len(here) == len(there)
    for a, b in zip(here, there):
        diff = int(np.abs(a - b).max())
        print(f"{graph}: ComfyUI {versions[0]} vs {versions[1]}: max |pixel difference| {diff}")
        assert diff == 0, f"{graph}: ComfyUI {versions[0]} and {versions[1]} give different images (max {diff})"
