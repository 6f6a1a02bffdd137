# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
# Pinned to a release, not a build: from PyPI on Linux torch==2.13.0 is the CUDA build (several GB of NVIDIA wheels),
# on macOS and Windows the CPU build, and where pip's find-links holds a +cpu wheel, that one. Name the index to
# choose: the CPU build anywhere, make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu";
# a CUDA build, make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
# (CUDA 13.0: Turing and later, NVIDIA driver 580 or newer; whl/cu126 for an older driver or GPU; torch 2.12 on
# publishes no cu128. lmlab.core.device.TORCH_BUILDS, which tests/test_device.py holds every such command to.)
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
DEMO_RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
# The demo trains for this long, start-up and evaluations included, on any machine, slow or busy: the model of the
# demo preset's family that this machine trains best in that time (--size auto, from the fit beside the preset).
DEMO_BUDGET ?= 5m
# The characters it samples from the run at the end.
DEMO_SAMPLE ?= 500
# The demo trains on a CUDA GPU where the machine has one (nvidia-smi is on the PATH) and lmlab's torch can use it
# (--device auto), else on the CPU (a Mac's MPS too is left to `lmlab train --device mps`); DEVICE=cpu keeps the
# laptop demo on a GPU machine. The same preset and fit either way: the fit predicts a size's val from its parameters
# and tokens, the same on any device, and each size's speed is timed where it trains.
DEVICE ?= $(if $(shell command -v nvidia-smi 2>/dev/null),auto,cpu)
CHROMIUM := /usr/bin/chromium

.PHONY: demo demo-commands test test-fast test-serial lint bench docs gpu-report gpu-nanogpt clean

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
# llama-cpp-python, which PyPI has no wheel of: pip compiles llama.cpp from its source distribution the first time
# (pip's wheel cache after), the longest step of the install. Built here is what its Python package loads: not the
# multimodal library (LLAVA_BUILD) nor llama.cpp's common helpers (tests/llama_cpp.cmake), which no test uses: 251 CPU
# seconds (6 min on 2 loaded cores) where the whole build took 646 (17 min). CMAKE_ARGS from the environment is added.
# pip's wheel cache keeps this build for any venv: `pip install --no-cache-dir llama-cpp-python` builds it whole.
# The two-host tests (tests/hosts.py) need `ip` (iproute2) and root: a root machine without it gets it here;
# elsewhere they skip.
LLAMA_CPP_CMAKE := -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE='$(CURDIR)/tests/llama_cpp.cmake'
$(VENV)/.installed-test: $(VENV)/.installed examples/context-vector/pyproject.toml $(CHROMIUM)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE) $(CMAKE_ARGS)" $(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps -e examples/context-vector
	@command -v ip >/dev/null || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && apt-get install -y -qq iproute2; } >/dev/null || echo "could not install iproute2"
	touch $@

# The browser tests/test_page.py drives: Debian's Chromium, installed where it is missing (as root, or with sudo).
$(CHROMIUM):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq chromium

# Where $(PYTHON) has a CUDA torch lmlab can use (a rented GPU's image), the demo runs on it through $(GPU_VENV), as
# gpu-report does (below): no torch is downloaded, nor anything a bundle brings; `source $(GPU_VENV)/bin/activate`
# puts its lmlab on the PATH. Otherwise, and whenever TORCH= is given, it builds $(VENV) with TORCH.
demo:
	$(if $(GPU_WHY),$(MAKE) $(VENV)/.installed,$(GPU_IMAGE))
	@$(MAKE) --no-print-directory demo-commands DEMO_RUN=$(DEMO_RUN) \
		LMLAB=$(if $(GPU_WHY),$(BIN)/lmlab,$(GPU_VENV)/bin/lmlab)

# The demo's own commands, with lmlab as LMLAB runs it: benchmarks/gpu_report.py runs them on a GPU for a minute.
LMLAB ?= $(BIN)/lmlab
demo-commands:
	$(LMLAB) prepare shakespeare --tokenizer char
	$(LMLAB) train configs/shakespeare-char-modern-cpu.toml --run $(DEMO_RUN) --device $(DEVICE) \
		--budget $(DEMO_BUDGET) --size auto
	@echo "--- a $(DEMO_SAMPLE)-character sample from $(DEMO_RUN):"
	@$(LMLAB) sample $(DEMO_RUN) --max-new-tokens $(DEMO_SAMPLE)

# pytest with these arguments, lint beside it and its output after the tests': cold (a fresh clone, as in CI) mypy
# takes a core for most of a minute, which the tests leave idle while they wait on a child process or collect.
PYTEST_AND_LINT = @lint=$$(mktemp); { $(LINT); } >$$lint 2>&1 & linting=$$!; \
	$(BIN)/python -m pytest -q $(1); tests=$$?; \
	wait $$linting; linted=$$?; cat $$lint; rm -f $$lint; \
	[ $$linted = 0 ] || echo "make $@: lint failed (above)"; [ $$tests = 0 ] && [ $$linted = 0 ]

# Every test whose verdict holds on a busy machine; those judged by wall time or load are test-serial's. Two
# workers (pytest-xdist), each the other's load, which every test here must stand; worksteal evens out the long ones.
test: $(VENV)/.installed-test
	$(call PYTEST_AND_LINT,-m "not serial" -n 2 --dist worksteal)

# The tests that take under about a second each (the others are marked slow), on the two workers `test` uses: about
# two minutes on two cores.
test-fast: $(VENV)/.installed-test
	$(call PYTEST_AND_LINT,-m "not slow and not serial" -n 2 --dist worksteal)

# Verdicts from wall time or the machine's load (a budget under a CPU hog, a latency): run on a quiet machine, with
# nothing else running. CI does not run them: its machine may be busy.
test-serial: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m serial

# ruff over lmlab/, tests/ and benchmarks/ and mypy over lmlab/ and the GPU-only tests/test_cuda.py (pyproject.toml's
# [tool.ruff] and [tool.mypy]): ruff in under a second, mypy in about 45 s the first time and seconds once its cache
# (.mypy_cache) holds the rest.
# `make test` and `make test-fast` run it beside the tests (so .ci/run does too).
LINT = $(BIN)/ruff check lmlab tests benchmarks && $(BIN)/mypy
lint: $(VENV)/.installed-test
	$(LINT)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/cpu_time_to_loss.py

# The reference pages written from the code (docs/reference/commands.md, config.md, api.md); tests/test_docs.py
# fails when they are stale.
docs: $(VENV)/.installed
	$(BIN)/python -m lmlab.commands.reference docs/reference

# Every GPU path measured on this machine's GPU, as one Markdown table, and the first hour's checklist of what only a
# GPU can settle: the lease check, 9 minutes of parts at most (benchmarks/gpu_report.py; ARGS=--dry-run runs it
# small on the CPU). gpu-nanogpt, a second command as long: nanoGPT's own train.py and bench.py beside lmlab's
# (NANOGPT_DIR=<a nanoGPT checkout>; benchmarks/nanogpt_side_by_side.py --gpu). A Python that has a CUDA torch at
# lmlab's floor (a rented GPU's image, often torch and numpy alone) is used through $(GPU_VENV), a venv over it that
# sees its torch and the checkout's lmlab, and reads what else lmlab needs from .gpu-bundle where it is (offline:
# `python benchmarks/gpu_needs.py --bundle .gpu-bundle` on a machine with the image's Python version where they are
# installed, copied over with the checkout), or else has pip install it beside (never torch), saying what first.
# Nothing is installed where that Python has it all. Otherwise, and whenever TORCH=<a CUDA build> is given on the
# command line, the venv, built with TORCH. Make picks the branch, so `make -n gpu-report` shows which
# (tests/test_gpu_report.py).
GPU_VENV := .venv-gpu
# Why the image's torch is not used, "" where it is: evaluated once, and only for the targets that use it (it
# imports torch).
GPU_WHY = $(eval GPU_WHY := $(if $(filter command line,$(origin TORCH)),TORCH is given,$(shell \
	$(PYTHON) benchmarks/gpu_needs.py --usable 2>/dev/null || \
	echo "$(PYTHON) cannot run benchmarks/gpu_needs.py")))$(GPU_WHY)

define GPU_IMAGE
@echo "$@: $(GPU_VENV), a venv over $(PYTHON) and its torch"
$(PYTHON) benchmarks/gpu_needs.py --venv $(GPU_VENV)
@need="$$($(GPU_VENV)/bin/python benchmarks/gpu_needs.py)" && [ -z "$$need" ] || { \
	echo "$@: $(GPU_VENV) lacks $$need: pip installs them (offline, bring them: benchmarks/gpu_needs.py --bundle)"; \
	$(GPU_VENV)/bin/python -m pip install --quiet $$need; }
endef

define GPU_VENV_TEST
@echo "$@: $(VENV) with TORCH=$(TORCH), as $(GPU_WHY)"
$(MAKE) $(VENV)/.installed-test
endef

# $(1): the script to run, with the branch's Python.
define GPU_SCRIPT
$(if $(GPU_WHY),$(GPU_VENV_TEST),$(GPU_IMAGE))
$(if $(GPU_WHY),$(BIN),$(GPU_VENV)/bin)/python $(1) $(ARGS)
endef

gpu-report:
	$(call GPU_SCRIPT,benchmarks/gpu_report.py)

gpu-nanogpt:
	$(call GPU_SCRIPT,benchmarks/nanogpt_side_by_side.py --gpu)

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
