# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
# Pinned: an unpinned torch pulls several GB of CUDA wheels. Override for a GPU build, e.g.
# make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
DEMO_RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
# The demo trains for this long, start-up and evaluations included, on any machine, slow or busy: the model of the
# demo preset's family that this machine trains best in that time (--size auto, from the fit beside the preset).
DEMO_BUDGET ?= 5m
CHROMIUM := /usr/bin/chromium

.PHONY: demo test test-fast lint bench docs gpu-report clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# lmlab with the extras the README's tour uses: serve (`lmlab serve`) and gguf (`lmlab export-gguf`). Every other
# extra a command needs is named by that command, with the pip command that installs it, when it is missing.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[serve,gguf]"
	touch $@

# The test extras, and examples/context-vector: the model plugin tests/test_plugins.py trains. The extras include
# llama-cpp-python, compiled from its source distribution the first time (minutes; pip's wheel cache after). The
# two-host tests (tests/hosts.py) need `ip` (iproute2) and root: a root machine without it gets it here; elsewhere
# they skip.
$(VENV)/.installed-test: $(VENV)/.installed examples/context-vector/pyproject.toml $(CHROMIUM)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps -e examples/context-vector
	@command -v ip >/dev/null || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && apt-get install -y -qq iproute2; } >/dev/null || echo "could not install iproute2"
	touch $@

# The browser tests/test_page.py drives: Debian's Chromium, installed where it is missing (as root, or with sudo).
$(CHROMIUM):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq chromium

demo: $(VENV)/.installed
	$(BIN)/lmlab prepare shakespeare --tokenizer char
	$(BIN)/lmlab train configs/shakespeare-char-modern-cpu.toml --run $(DEMO_RUN) --device cpu --budget $(DEMO_BUDGET) \
		--size auto
	@echo "--- a 500-character sample from $(DEMO_RUN):"
	@$(BIN)/lmlab sample $(DEMO_RUN) --max-new-tokens 500

test: lint
	$(BIN)/python -m pytest -q

# The tests that take under about a second each (the others are marked slow): under a minute on two cores.
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

# ruff and mypy over lmlab/ (pyproject.toml's [tool.ruff] and [tool.mypy]): ruff in under a second, mypy in about
# 45 s the first time and seconds once its cache (.mypy_cache) holds the rest. `make test` and `make test-fast` run
# it first, so .ci/run does too.
lint: $(VENV)/.installed-test
	$(BIN)/ruff check lmlab
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/cpu_time_to_loss.py

# The reference pages written from the code (docs/reference/commands.md, config.md, api.md); tests/test_docs.py
# fails when they are stale.
docs: $(VENV)/.installed
	$(BIN)/python -m lmlab.commands.reference docs/reference

# Every GPU path measured on this machine's GPU, as one Markdown table, and the first hour's checklist of what only a
# GPU can settle (benchmarks/gpu_report.py; ARGS=--dry-run runs it small on the CPU). A Python that has torch (a
# rented GPU's image, often torch and numpy alone) is used through $(GPU_VENV), a venv over it that sees its torch
# and gets what else lmlab needs installed beside it (benchmarks/gpu_needs.py; never torch); otherwise the venv,
# built with TORCH=<a CUDA build>.
GPU_VENV := .venv-gpu
gpu-report:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "gpu-report: $(GPU_VENV), a venv over $(PYTHON) and its torch"; \
		$(PYTHON) benchmarks/gpu_needs.py --venv $(GPU_VENV) || exit 2; \
		need="$$($(GPU_VENV)/bin/python benchmarks/gpu_needs.py)" || exit 2; \
		[ -z "$$need" ] || $(GPU_VENV)/bin/python -m pip install --quiet $$need || exit 2; \
		PYTHONPATH="$(CURDIR)" $(GPU_VENV)/bin/python benchmarks/gpu_report.py $(ARGS); \
	else \
		$(MAKE) $(VENV)/.installed-test && $(BIN)/python benchmarks/gpu_report.py $(ARGS); \
	fi

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
