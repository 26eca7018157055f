# Two commands: `make demo` (set up + run the main job) and `make test`. Both create .venv when missing.
# torch goes in first: a CPU build (2.13.0) when no NVIDIA GPU is present, otherwise the default CUDA build.
# Elsewhere than this project's machines, pass the CPU wheel index: make TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
EXTRAS ?= test
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-all lint readme-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet "torch>=$(TORCH_VERSION)"; \
	else \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_INDEX); \
	fi
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: venv
	$(VENV)/bin/prefopt demo

test: venv
	$(PY) -m pytest -q

test-all: venv
	$(PY) -m pytest -q -m "slow or not slow"

# ruff's settings are in pyproject.toml ([tool.ruff]); `ruff format .` then `ruff check --fix .` fix most findings.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Every command of README.md, in order, on a fresh copy of the repository (scripts/check_readme.py).
readme-check: venv
	$(PY) scripts/check_readme.py

clean:
	rm -rf runs .prefopt_cache
