# ComfyUI-HY-WU: `make demo` runs the built-in demo, `make test` runs the test suite.
# Both create/refresh the virtual environment .venv/ from the project's own files first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Torch for the venv. A CPU build keeps it small; on a CUDA machine set TORCH_SPEC / TORCH_INDEX,
# e.g. `make test TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: venv comfyui chromium test test-core demo docs bench clean

venv: $(VENV)/.stamp

$(VENV)/.stamp: requirements.txt requirements-train.txt requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

comfyui: venv
	bash scripts/setup_comfyui.sh

chromium:
	bash scripts/setup_chromium.sh

# OpenMP threads that spin-wait on 2 shared cores (the test server, trainer subprocesses and pytest
# run side by side) made tiny-model steps up to 80x slower; passive waiting changes no result.
# Two passes: every test on the newest ComfyUI (COMFYUI_PATH, else ../shared/comfyui/0.30.0, else
# 0.3.75), then the tests marked `floor` on 0.3.75, pyproject's requires-comfyui (skipped when the
# newest is 0.3.75 itself). Both passes run; the target fails if either does.
test: venv comfyui chromium
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest; newest=$$?; \
	if [ "$$($(PY) tests/comfy_harness.py newest)" != "$$($(PY) tests/comfy_harness.py floor)" ]; then \
	  echo "== the floor set on ComfyUI $$($(PY) tests/comfy_harness.py floor-version) =="; \
	  HYWU_COMFYUI=floor OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -m floor; floor=$$?; \
	else floor=0; fi; \
	test $$newest -eq 0 -a $$floor -eq 0

# The pure-torch core only (seconds; no ComfyUI needed).
test-core: venv
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest tests/test_core_*.py

demo: venv comfyui
	$(PY) scripts/hywu_demo.py

# The pictures of README.md and docs/: template screenshots in the real frontend, the trainer's
# loss plot and sample grid (tests/test_docs.py checks the screenshots are current).
docs: venv comfyui chromium
	OMP_WAIT_POLICY=PASSIVE $(PY) scripts/make_docs_images.py

bench: venv
	$(PY) bench/generator.py

clean:
	rm -rf $(VENV) .cache output
