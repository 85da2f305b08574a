"""Drive ComfyUI's own frontend with the Python playwright package and Debian's chromium.

    open_frontend(server_url, screenshot_path=None, timeout_ms=60000) -> dict
        opens the page, waits for window.app, closes the Templates dialog, optionally screenshots;
        returns {"seconds": float, "title": str, "node_count": int, "console_errors": [...]}
    load_workflow(server_url, workflow, screenshot_path=None, timeout_ms=60000) -> list[dict]
        loads a UI-format workflow (dict or path) with app.loadGraphData(json) and returns one
        dict per node: {"id" (a string), "type", "title", "has_errors", "missing"} ("missing": the node
        type is not registered in the frontend, i.e. ComfyUI could not load its class).
    fit_and_screenshot(page, path)
        fits the loaded graph into a 2200x1000 view (or width, height) and saves a screenshot
    chromium_path() -> str | None
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]


def chromium_path():
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else None


@contextmanager
def _page(server_url, timeout_ms=60000):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(timeout_ms)
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            t0 = time.time()
            page.goto(server_url, wait_until="domcontentloaded")
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas",
                                   timeout=timeout_ms)
            _close_dialogs(page)
            page._hywu_errors = errors
            page._hywu_t0 = t0
            yield page
        finally:
            browser.close()


def _close_dialogs(page):
    # The first start shows a "Templates" dialog over the canvas. Close any PrimeVue dialog.
    for _ in range(10):
        n = page.evaluate("""() => {
            const ds = document.querySelectorAll('.p-dialog, [role=dialog]');
            let closed = 0;
            for (const d of ds) {
                const b = d.querySelector('.p-dialog-close-button, .p-dialog-header-close, button[aria-label=Close], button[aria-label=close], button[aria-label="Close dialog"]');
                if (b) { b.click(); closed++; }
            }
            return document.querySelectorAll('.p-dialog, [role=dialog]').length;
        }""")
        if not n:
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def open_frontend(server_url, screenshot_path=None, timeout_ms=60000) -> dict:
    with _page(server_url, timeout_ms) as page:
        page.wait_for_timeout(500)
        _close_dialogs(page)
        if screenshot_path:
            Path(screenshot_path).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot_path))
        return {
            "seconds": time.time() - page._hywu_t0,
            "title": page.title(),
            "node_count": page.evaluate("() => window.app.graph._nodes.length"),
            "dialogs_open": page.evaluate("() => document.querySelectorAll('.p-dialog, [role=dialog]').length"),
            "console_errors": list(page._hywu_errors),
        }


# ids as strings: the frontend of ComfyUI 0.30 keeps them as strings, 0.3.75's as numbers
_NODE_STATE_JS = """() => window.app.graph._nodes.map(n => ({
    id: String(n.id),
    type: n.type,
    title: n.title,
    has_errors: !!(n.has_errors || (n.flags && n.flags.has_errors)),
    missing: !(n.type in LiteGraph.registered_node_types),
}))"""


def load_workflow(server_url, workflow, screenshot_path=None, timeout_ms=60000) -> list[dict]:
    if not isinstance(workflow, dict):
        workflow = json.loads(Path(workflow).read_text())
    with _page(server_url, timeout_ms) as page:
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        page.wait_for_timeout(500)
        _close_dialogs(page)
        if screenshot_path:
            Path(screenshot_path).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot_path))
        return page.evaluate(_NODE_STATE_JS)


def fit_and_screenshot(page, path, width=2200, height=1000):
    """Fit the loaded graph into a width x height view (titles and widgets drawn) and screenshot the page."""
    page.set_viewport_size({"width": width, "height": height})
    page.wait_for_timeout(300)
    page.evaluate("""async () => {
        // draw titles and widgets also when zoomed out
        try { await window.app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 1); } catch (e) {}
        // close the 'Nodes 2.0' banner / toasts if present, then fit the graph into view
        for (const b of document.querySelectorAll('button')) {
            const r = b.getBoundingClientRect();
            if (r.top < 45 && r.right > window.innerWidth - 60) b.click();
        }
        try { window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); } catch (e) {}
        window.app.graph.setDirtyCanvas(true, true);
    }""")
    page.wait_for_timeout(600)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
