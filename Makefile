# Two commands for a fresh machine:   make demo   and   make test
# (each runs `make setup` first: a venv with torch, ComfyUI's requirements and test tools).
#
# Which ComfyUI: $COMFYUI_PATH, the ComfyUI this folder sits in, ~/ComfyUI, or source archives:
#   make test COMFYUI_ARCHIVE="../shared/comfyui/ComfyUI-0.3.64.tar.gz ../shared/comfyui/ComfyUI-0.8.0.tar.gz ../shared/comfyui/ComfyUI-0.29.0.tar.gz"
# runs the whole suite on the first and the ComfyUI tests on each further one.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The pack itself never pins torch; this is only the development environment.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# ComfyUI 0.29 imports torchaudio at start; its newest release imports beside torch 2.14.1 but pins an
# older torch, so it is installed without its dependencies.
TORCHAUDIO ?= torchaudio==2.11.1
STAMP  := $(VENV)/.setup-done
export COMFYUI_ARCHIVE COMFYUI_PATH COMFYUI_CACHE

.PHONY: setup demo test clean

# The venv, torch and the test tools once; ComfyUI's part on every call (it redoes itself
# whenever the ComfyUI it finds changes, and is quick otherwise).
setup: $(STAMP)
	$(PY) devkit/setup_env.py setup

$(STAMP): tests/requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-deps $(TORCHAUDIO)
	$(PY) -m pip install -q -r tests/requirements.txt
	touch $(STAMP)

demo: setup
	$(PY) -m benchmarks.demo

test: setup
	$(PY) devkit/setup_env.py test $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .cache
