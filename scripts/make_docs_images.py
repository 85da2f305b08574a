#!/usr/bin/env python
"""The pictures of README.md and docs/ (`make docs`; not part of `make test`).

* docs/images/template_<name>.png: each shipped template (example_workflows/) as ComfyUI's own
  frontend shows it, in headless Chromium against a headless ComfyUI (the newest tree `make test`
  uses). The server's model folders hold files of the names the templates use (empty placeholders
  for the bases that are not here: the templates are only shown, not run), so no loader is red.
  Each PNG records the sha256 of the UI workflow it shows (tests/test_docs.py checks it).
* docs/images/trainer_loss.png and trainer_samples.png: what `python -m trainer.train` writes,
  from a short run on the tiny seeded SD1.5 base (trainer/configs/tiny_sd15.yaml).

docs/demo_grid.png comes from `make demo` (output/demo/grid.png of its run).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
for p in (REPO / "tests", REPO / "example_workflows"):
    sys.path.insert(0, str(p))

import build_api  # noqa: E402
import comfy_harness  # noqa: E402
import frontend  # noqa: E402


def _model_files() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for wf in build_api.WORKFLOWS.values():
        for node in wf.values():
            for key, value in node["inputs"].items():
                if key in build_api.MODEL_FILE_FOLDERS and isinstance(value, str):
                    out.setdefault(build_api.MODEL_FILE_FOLDERS[key], set()).add(value)
    return out


def _tag(png: Path, digest: str) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("hywu_workflow_sha256", digest)
    with Image.open(png) as im:
        im.load()
        im.save(png, pnginfo=info, optimize=True)


def template_screenshots() -> list[Path]:
    written = []
    with tempfile.TemporaryDirectory(prefix="hywu_docs_") as base, comfy_harness.ComfyServer(base_dir=base) as srv:
        for folder, names in _model_files().items():
            (srv.models_dir / folder).mkdir(parents=True, exist_ok=True)
            for name in names:
                (srv.models_dir / folder / name).touch()
        with frontend._page(srv.url) as page:
            for name, title in build_api.TITLES.items():
                ui_file = REPO / "example_workflows" / f"{title}.json"
                page.evaluate("async ([wf, n]) => { await window.app.loadGraphData(wf, true, true, n); }",
                              [json.loads(ui_file.read_text()), f"{title}.json"])
                page.wait_for_timeout(500)
                frontend._close_dialogs(page)
                red = [n["type"] for n in page.evaluate(frontend._NODE_STATE_JS) if n["has_errors"]]
                if red:
                    raise SystemExit(f"{title}: nodes shown red: {red}")
                shot = IMAGES / f"template_{name}.png"
                frontend.fit_and_screenshot(page, shot, width=1800, height=820)
                _tag(shot, hashlib.sha256(ui_file.read_bytes()).hexdigest())
                written.append(shot)
    return written


def trainer_pictures(steps: int) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="hywu_docs_train_") as out:
        subprocess.run([sys.executable, "-m", "trainer.train", "--config", "trainer/configs/tiny_sd15.yaml",
                        "--output", out, "--max-steps", str(steps), f"--train.validate_every={steps}"],
                       cwd=REPO, check=True)
        samples = sorted(Path(out, "samples").glob("step-*.png"))
        pairs = [(Path(out, "loss.png"), IMAGES / "trainer_loss.png"), (samples[-1], IMAGES / "trainer_samples.png")]
        for src, dst in pairs:
            shutil.copyfile(src, dst)
        return [dst for _, dst in pairs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120, help="steps of the tiny trainer run")
    ap.add_argument("--only", choices=("templates", "trainer"), help="make one kind of picture only")
    a = ap.parse_args(argv)
    if frontend.chromium_path() is None and a.only != "trainer":
        raise SystemExit("no /usr/bin/chromium: run scripts/setup_chromium.sh")
    IMAGES.mkdir(parents=True, exist_ok=True)
    written = []
    if a.only != "trainer":
        written += template_screenshots()
    if a.only != "templates":
        written += trainer_pictures(a.steps)
    for p in written:
        print(p.relative_to(REPO))


if __name__ == "__main__":
    main()
