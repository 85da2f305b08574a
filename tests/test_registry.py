"""The pack passes the Comfy Registry's own validation (`comfy node validate`: pyproject
metadata and the security checks: no eval/exec, no package installs at run time)."""
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_comfy_node_validate_passes():
    comfy = Path(sys.executable).with_name("comfy")
    out = subprocess.run([str(comfy), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    # comfy-cli exits 0 on security warnings (eval/exec, ...) and only prints them.
    assert out.returncode == 0 and "All validation checks passed" in text, text
    assert "warning" not in text.lower(), text


def test_pyproject_registry_metadata_and_requirements_agree():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["tool"]["comfy"]["PublisherId"] and meta["project"]["name"] == "comfyui-hy-wu"
    reqs = [l.split("#")[0].strip() for l in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r]
    assert reqs == meta["project"]["dependencies"]
    # Installing the pack into a user's ComfyUI must never reinstall torch.
    assert not any(r.split("=")[0].split(">")[0].split("<")[0].strip().lower() in ("torch", "torchvision", "torchaudio") for r in reqs)
