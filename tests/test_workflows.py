"""Workflows in example_workflows/: every UI-format workflow (what a user drags in or opens from
the Templates dialog; the file name is its title) has an API-format twin in
example_workflows/api/ (what the tests queue) and a thumbnail; they agree, ComfyUI serves them
as templates, and the runnable ones run through POST /prompt + /history and save an image.

Regenerate the UI twins from the API ones with ComfyUI's own frontend (after editing
example_workflows/build_api.py):  .venv/bin/python tests/test_workflows.py --regenerate-ui
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

import comfy_harness
import hywu_graphs as g

pytestmark = pytest.mark.floor  # also on ComfyUI 0.3.75, the requires-comfyui floor (Makefile)

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
sys.path.insert(0, str(g.WORKFLOWS))
import build_api  # noqa: E402  (example_workflows/build_api.py)

sys.path.pop(0)

UI_NAMES = sorted(build_api.WORKFLOWS)


# ---------------------------------------------------------------------------------------------
# UI format -> API format (what the frontend's graphToPrompt does for these graphs)
# ---------------------------------------------------------------------------------------------
def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def widget_layout(node_info: dict) -> list[tuple[str, int]]:
    """(input name, number of extra serialised values after it) for each widget, in order."""
    out = []
    for section in ("required", "optional"):
        for name in node_info.get("input_order", {}).get(section, []):
            spec = node_info["input"][section][name]
            if not _is_widget(spec):
                continue
            opts = spec[1] if len(spec) > 1 else {}
            extra = int(bool(opts.get("control_after_generate"))) + int(bool(opts.get("image_upload")))
            out.append((name, extra))
    return out


def ui_to_api(ui: dict, object_info: dict) -> dict:
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = object_info[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        pos = 0
        for name, extra in widget_layout(info):
            if pos < len(values) and name not in linked:
                inputs[name] = values[pos]
            pos += 1 + extra
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, origin, slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(origin), slot]
        # like graphToPrompt: a node without its own title carries its display name
        title = node.get("title") or info.get("display_name") or node["type"]
        entry = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
        api[str(node["id"])] = entry
    return api


def normalise(api: dict, object_info: dict) -> dict:
    """Comparable form: numbers as floats; inputs this ComfyUI does not have dropped (a server
    ignores them: the API twins carry what the newest ComfyUI requires); a title that is only the
    node's name (its type, or the display name newer ComfyUI gives core nodes) as None."""
    def norm(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return v
        return float(v)

    def known(class_type):
        spec = object_info[class_type]["input"]
        return {name for section in ("required", "optional") for name in spec.get(section, {})}

    def title(n):
        t = n.get("_meta", {}).get("title")
        return None if t in (n["class_type"], object_info[n["class_type"]].get("display_name")) else t

    return {k: {"class_type": n["class_type"], "title": title(n),
                "inputs": {ik: (iv if isinstance(iv, list) else norm(iv)) for ik, iv in n["inputs"].items()
                           if ik in known(n["class_type"])}}
            for k, n in api.items()}


def ui_path(name: str) -> Path:
    return g.WORKFLOWS / f"{build_api.TITLES[name]}.json"


def load_ui(name: str) -> dict:
    return json.loads(ui_path(name).read_text())


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_every_workflow_has_both_twins_and_a_thumbnail():
    ui = {p.stem for p in g.WORKFLOWS.glob("*.json")}
    api = {p.stem for p in g.API_DIR.glob("*.json")}
    assert set(build_api.TITLES) == set(UI_NAMES) == api, (build_api.TITLES, api)
    assert ui == set(build_api.TITLES.values()), ui
    assert {"hywu_edit_sd15_ip2p", "hywu_demo"} <= api and api & {"hywu_edit_flux_kontext", "hywu_edit_qwen_image_edit"}
    for title in ui:
        thumb = g.WORKFLOWS / f"{title}.jpg"  # the frontend asks for <title>.jpg
        assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"no JPEG thumbnail {thumb.name}"


def test_api_files_match_their_builder():
    for name, wf in build_api.WORKFLOWS.items():
        assert g.load_api(name) == json.loads(json.dumps(wf)), f"example_workflows/api/{name}.json is stale: run example_workflows/build_api.py"


def test_example_inputs_are_current():
    """The shipped images are what scripts/make_examples.py makes now (rerun it after changing the demo world)."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(g.REPO / "scripts"))
    try:
        import make_examples
    finally:
        sys.path.remove(str(g.REPO / "scripts"))
    for name, made in make_examples.inputs().items():
        shipped = Image.open(g.WORKFLOWS / "input" / name).convert("RGB")
        assert np.array_equal(np.asarray(shipped), np.asarray(made.convert("RGB"))), \
            f"example_workflows/input/{name} is stale: run scripts/make_examples.py"


def test_templates_are_served_by_comfyui(hywu_env):
    """ComfyUI lists example_workflows/*.json of the pack as templates and serves them with thumbnails."""
    import requests

    srv = hywu_env.server
    listed = srv._get("/api/workflow_templates").json()
    pack = comfy_harness.PACK_NAME
    assert sorted(listed.get(pack, [])) == sorted(build_api.TITLES.values()), listed
    for name, title in build_api.TITLES.items():
        base = f"{srv.url}/api/workflow_templates/{pack}/{quote(title)}"
        r = requests.get(base + ".json", timeout=30)
        assert r.ok and r.json() == load_ui(name)
        r = requests.get(base + ".jpg", timeout=30)
        assert r.ok and r.content[:3] == b"\xff\xd8\xff"


def test_example_inputs_ship_and_reach_the_input_folder(hywu_env):
    """The example images are in the repo and the pack copies them into ComfyUI's input folder."""
    used = {n["inputs"]["image"] for wf in build_api.WORKFLOWS.values() for n in wf.values()
            if n["class_type"] == "LoadImage"}
    assert used == {build_api.DEMO_IMAGE, build_api.EXAMPLE_IMAGE}
    for name in used:
        shipped = g.WORKFLOWS / "input" / name
        assert shipped.is_file() and shipped.stat().st_size < 200_000, name
        assert (hywu_env.server.input_dir / name).read_bytes() == shipped.read_bytes()


@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_and_api_twins_agree(hywu_env, name):
    object_info = hywu_env.server.object_info()
    ui = load_ui(name)
    assert ui.get("version") and ui["nodes"] and ui["links"], "not a UI-format workflow"
    assert all(n["type"] in object_info for n in ui["nodes"]), "a node type is not registered"
    assert normalise(ui_to_api(ui, object_info), object_info) == normalise(g.load_api(name), object_info)


MODEL_FILE_INPUTS = set(build_api.MODEL_FILE_FOLDERS)
# how a server says a model file is not installed: not among a combo's options, or HY-WU Load
# Generator's own check (ComfyUI 0.30 validates V3 combos through the node's validate_inputs)
MISSING_FILE_ERRORS = {"value_not_in_list", "custom_validation_failed"}


@pytest.mark.parametrize("name", sorted(set(UI_NAMES) - set(build_api.RUNNABLE)))
def test_api_template_as_shipped_validates_but_for_its_model_files(hywu_env, name):
    """POST /prompt of a shipped API twin whose model files the test server lacks: refused only
    because those files are not installed. A required input the server's ComfyUI added (e.g.
    ImageScaleToTotalPixels' resolution_steps in 0.30) fails it. (The runnable twins run below.)"""
    with pytest.raises(comfy_harness.PromptRejected) as e:
        hywu_env.server.queue(g.load_api(name))
    data = e.value.response
    problems = [(node_id, err.get("type"), (err.get("extra_info") or {}).get("input_name"))
                for node_id, node in (data.get("node_errors") or {}).items() for err in node.get("errors", [])]
    assert problems, data
    wrong = [p for p in problems if p[1] not in MISSING_FILE_ERRORS or p[2] not in MODEL_FILE_INPUTS]
    assert not wrong, f"{name}: refused for more than missing model files: {wrong}"


def test_templates_use_no_deprecated_or_replaced_node(hywu_env):
    """Newer ComfyUI deprecates core nodes and rewrites old ones into new ones (GET /node_replacements,
    0.28+); a template built on either would change under the user. 0.3.75 has neither."""
    import requests

    srv = hywu_env.server
    info = srv.object_info()
    r = requests.get(srv.url + "/node_replacements", timeout=30)
    replaced = set(r.json()) if r.ok and r.headers.get("content-type", "").startswith("application/json") else set()
    used = {n["class_type"] for wf in build_api.WORKFLOWS.values() for n in wf.values()}
    assert not sorted(t for t in used if info[t].get("deprecated") or t in replaced)


@pytest.mark.parametrize("name", build_api.RUNNABLE)
def test_runnable_workflow_runs_and_saves_an_image(hywu_env, name):
    """As shipped (shipped input image, instruction, steps), with the test pair for the demo's files."""
    srv = hywu_env.server
    entry = srv.run(g.with_test_files(g.load_api(name)), timeout=300)
    paths = srv.output_images(entry)
    assert paths and all(p.is_file() and p.stat().st_size > 0 for p in paths)
    print(f"{name}: saved {[p.name for p in paths]}")


def test_real_use_sd15_workflow_runs_with_the_micro_models_swapped_in(hywu_env):
    """The real-use SD1.5 graph is the demo graph with other file names and a scale node (0.25 MP): run it with the
    micro files, the scale node at its smallest setting (0.01 MP) for CPU time."""
    wf = g.load_api("hywu_edit_sd15_ip2p")
    wf["1"]["inputs"]["ckpt_name"] = "hywu_micro_sd15_ip2p.safetensors"
    wf["3"]["inputs"]["generator_name"] = hywu_env.generators["seeded"]
    wf["9"]["inputs"]["steps"] = 2
    assert wf["12"]["class_type"] == "ImageScaleToTotalPixels" and wf["4"]["inputs"]["image"] == ["12", 0]
    wf["12"]["inputs"]["megapixels"] = 0.01
    entry = hywu_env.server.run(wf, timeout=300)
    assert hywu_env.server.output_images(entry)


# ---------------------------------------------------------------------------------------------
# regenerate the UI twins with the real frontend
# ---------------------------------------------------------------------------------------------
def _tidy(ui: dict, name: str) -> dict:
    """Drop the frontend's null fields, number links 1..n, fix the seed, stable id."""
    def clean(d):
        return {k: v for k, v in d.items() if v is not None}

    remap = {old[0]: i + 1 for i, old in enumerate(sorted(ui["links"], key=lambda l: l[0]))}
    ui["links"] = [[remap[l[0]], *l[1:]] for l in sorted(ui["links"], key=lambda l: l[0])]
    ui["last_link_id"] = len(remap)
    for node in ui["nodes"]:
        for k in [k for k, v in node.items() if v is None]:
            del node[k]
        node["inputs"] = [clean(i) for i in node.get("inputs", [])]
        for i in node["inputs"]:
            if "link" not in i:
                i["link"] = None
            elif i["link"] is not None:
                i["link"] = remap[i["link"]]
        node["outputs"] = [clean(o) for o in node.get("outputs", [])]
        for o in node["outputs"]:
            o["links"] = [remap[x] for x in (o.get("links") or [])]
        if node["type"] in ("KSampler", "KSamplerAdvanced") and len(node.get("widgets_values", [])) > 1:
            node["widgets_values"][1] = "fixed"
    # re-stack each column so that nodes which grow (Load Image shows its picture) do not overlap
    columns: dict[float, list] = {}
    for node in ui["nodes"]:
        columns.setdefault(round(node["pos"][0]), []).append(node)
    for nodes in columns.values():
        nodes.sort(key=lambda n: n["pos"][1])
        y = nodes[0]["pos"][1]
        for node in nodes:
            node["pos"] = [node["pos"][0], y]
            y += node["size"][1] + 60 + (300 if node["type"] == "LoadImage" else 0)
    for k in [k for k, v in ui.items() if v is None]:
        del ui[k]
    if isinstance(ui.get("extra"), dict):
        ui["extra"] = clean(ui["extra"])
    ui["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"hywu-comfy/workflows/{name}"))  # stable across the move
    return ui


def regenerate_ui(url: str) -> list[Path]:
    import frontend

    written = []
    with frontend._page(url) as page:
        for name in UI_NAMES:
            api = g.load_api(name)
            ui = page.evaluate("async ([wf, n]) => { await window.app.loadApiJson(wf, n); "
                               "return window.app.graph.serialize(); }", [api, build_api.TITLES[name] + ".json"])
            path = ui_path(name)
            path.write_text(json.dumps(_tidy(ui, name), indent=2) + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    if "--regenerate-ui" not in sys.argv:
        sys.exit(__doc__)
    import comfy_harness

    repo = g.REPO
    with comfy_harness.ComfyServer(checkpoints=[repo / "models/checkpoints/hywu_micro_sd15_ip2p.safetensors"],
                                   extra_models={"hywu": sorted((repo / "models/hywu").glob("*.safetensors"))}) as srv:
        for p in regenerate_ui(srv.url):
            print(p)
