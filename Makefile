# `make demo` and `make test` each set up .venv on their own (CPU PyTorch from this machine's disk).
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
DATA    ?= data/synth
RUN     ?= runs/demo
NPROC   ?= 2
PORT    ?= 29533
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo data pretrain test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@echo "[setup 1/4] virtual environment in $(VENV)"
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "[setup 2/4] $(TORCH) (CPU build; about a minute)"
	$(PY) -m pip install --quiet "$(TORCH)"
	@echo "[setup 3/4] the project and its dependencies (DeepSpeed, WebDataset, PyAV, transformers, ...; 1-2 minutes)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@echo "[setup 4/4] compiling DeepSpeed's CPU ops once (about a minute)"
	$(PY) -m pretrain.ops  # before parallel launches wait on them
	touch $@

data: $(DATA)/val/index.json

$(DATA)/val/index.json: | setup
	$(PY) -m shards synth --out $(DATA) --videos 256 --val-videos 64 --seed 0 --workers 2

pretrain: setup data
	rm -rf $(RUN)
	deepspeed --num_gpus $(NPROC) --master_port $(PORT) pretrain/run.py \
		--config pretrain/configs/demo.yaml --run-dir $(RUN)

demo: pretrain
	$(PY) -m pretrain.evaluate $(RUN)/eval.json --min-over-chance 5  # fails if the model learned nothing

test: setup
	$(PY) -m pytest -q -rs tests

clean:
	rm -rf $(RUN) $(DATA)
