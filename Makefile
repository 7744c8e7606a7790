# Two commands for a fresh machine:   make demo   and   make test
# (each runs `make setup` first: a venv with torch, ComfyUI's requirements and test tools).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The pack itself never pins torch; this is only the development environment.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.setup-done

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): tests/requirements.txt benchmarks/setup_env.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) benchmarks/setup_env.py
	$(PY) -m pip install -q -r tests/requirements.txt
	touch $(STAMP)

demo: setup
	$(PY) -m benchmarks.demo

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
