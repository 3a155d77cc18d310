# Two commands do all set-up on a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint app bench gpu-check clean-venv

# (Re)create the virtual environment when it is missing or pyproject/constraints changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[app,dev,distill]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m diffaccel.cli demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

app: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m diffaccel.cli app

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m diffaccel.cli bench --threads 2

# The GPU check (benchmarks/gpu_check.py): runs with this checkout's venv when there is one, else with the
# machine's own python (a GPU machine keeps its CUDA torch); results go to $(GPU_OUT).
GPU_OUT ?= gpu_check_results
gpu-check:
	HF_HUB_OFFLINE=1 $(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_check.py --out $(GPU_OUT)

clean-venv:
	rm -rf $(VENV)
