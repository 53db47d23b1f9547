# The two commands: `make demo` and `make test`. Both create/refresh .venv as needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, so that pip never resolves a multi-GB CUDA build by accident. On this kind of
# machine pip finds the CPU wheel of torch 2.13.0 on local disk. On a GPU host pick your build,
# e.g. `make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_OUT ?= demo-output
STAMP := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prcore demo --output $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check prcore tasks flows tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT)
