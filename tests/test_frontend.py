"""ComfyUI's own frontend (comfyui-frontend-package) in headless Chromium: each UI workflow
loads with every node known and none red but the loaders whose model file the test server does
not have (newer frontends mark those), the frontend turns it into the same prompt as its
API twin, and the runnable ones queue from the browser and complete. Screenshots go to
output/test_frontend/<workflow>.png."""
from __future__ import annotations

import time

import pytest

import frontend
import hywu_graphs as g
from test_workflows import MODEL_FILE_INPUTS, UI_NAMES, build_api, load_ui, normalise, ui_to_api

pytestmark = pytest.mark.floor  # also on ComfyUI 0.3.75, the requires-comfyui floor (Makefile)

SHOTS = g.REPO / "output" / "test_frontend"


def _wait_new_history(srv, before: set, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = srv._get("/history").json()
        new = [k for k in h if k not in before]
        for k in new:
            st = h[k].get("status") or {}
            if st.get("completed") or st.get("status_str") in ("success", "error"):
                return k, h[k]
        time.sleep(0.3)
    raise AssertionError(f"the prompt queued from the frontend did not finish in {timeout}s\n{srv.log_tail()}")


def _nodes_with_missing_files(ui: dict, object_info: dict) -> set[str]:
    """Ids of the nodes whose model-file input names a file this server does not have."""
    out = set()
    for node_id, node in ui_to_api(ui, object_info).items():
        spec = object_info[node["class_type"]]["input"]
        for key, value in node["inputs"].items():
            entry = spec.get("required", {}).get(key) or spec.get("optional", {}).get(key) or [None]
            # a combo: [options, {...}], or ["COMBO", {"options": [...]}] (V3 nodes)
            options = entry[0] if isinstance(entry[0], list) else (entry[1:] or [{}])[0].get("options")
            if key in MODEL_FILE_INPUTS and isinstance(options, list) and value not in options:
                out.add(node_id)
    return out


@pytest.mark.parametrize("name", UI_NAMES)
def test_frontend_loads_converts_and_queues(hywu_env, name):
    if frontend.chromium_path() is None:
        pytest.skip("no system chromium (scripts/setup_chromium.sh)")
    srv = hywu_env.server
    object_info = srv.object_info()
    ui = g.with_test_files(load_ui(name))  # the demo's files -> the seeded test pair
    with frontend._page(srv.url) as page:
        page.evaluate("async ([wf, n]) => { await window.app.loadGraphData(wf, true, true, n); }",
                      [ui, build_api.TITLES[name] + ".json"])
        page.wait_for_timeout(500)
        frontend._close_dialogs(page)
        nodes = page.evaluate(frontend._NODE_STATE_JS)
        assert len(nodes) == len(ui["nodes"])
        missing = [n["type"] for n in nodes if n["missing"]]
        not_installed = _nodes_with_missing_files(ui, object_info)
        red = [n["type"] for n in nodes if n["has_errors"] and str(n["id"]) not in not_installed]
        assert not missing and not red, f"missing node types {missing}, nodes with errors {red}"
        prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        assert normalise(prompt, object_info) == normalise(g.with_test_files(g.load_api(name)), object_info), \
            "frontend prompt differs from the API twin"
        if name in build_api.RUNNABLE:
            before = set(srv._get("/history").json())
            page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
            pid, entry = _wait_new_history(srv, before)
            err = srv.execution_error(entry)
            assert entry["status"]["status_str"] == "success", f"queued from the frontend, failed: {err}"
            assert srv.output_images(entry)
            page.wait_for_timeout(800)
            assert not page.evaluate("() => window.app.lastNodeErrors && Object.keys(window.app.lastNodeErrors).length")
            red = [n["type"] for n in page.evaluate(frontend._NODE_STATE_JS) if n["has_errors"]]
            assert not red, f"nodes red after the run: {red}"
        shot = SHOTS / f"{name}.png"
        frontend.fit_and_screenshot(page, shot)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
