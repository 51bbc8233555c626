# One command per task. Every target sets up what it needs (virtualenv,
# dependencies, generated code) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PROTOS := $(wildcard protos/datasetd/v1/*.proto)
GEN_DIR := service/gen

.PHONY: run test test-slow test-torch lint proto proto-check bench bench-search bench-auth bench-scale bench-peers clean setup prometheus

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

## proto: generate Python code and typed stubs from protos/ into service/gen
proto: $(VENV)/.installed
	$(PY) -m service.tools.gen_protos $(GEN_DIR)

## proto-check: fail when the committed generated code is stale
proto-check: $(VENV)/.installed
	$(PY) -m service.tools.gen_protos --check $(GEN_DIR)

## run: start datasetd (embedded PostgreSQL and S3 unless configured otherwise)
run: $(VENV)/.installed
	$(PY) -m service.tools.gen_protos --check $(GEN_DIR) || $(PY) -m service.tools.gen_protos $(GEN_DIR)
	$(PY) -m service serve

## prometheus: the Debian prometheus binary the metrics test scrapes datasetd with
prometheus:
	command -v prometheus >/dev/null || apt-get install -y --no-install-recommends prometheus || (apt-get update && apt-get install -y --no-install-recommends prometheus)

## test: the whole suite against real PostgreSQL and a real S3 server
test: $(VENV)/.installed proto-check prometheus
	$(PY) -m pytest -q

## test-slow: soak and crash tests excluded from `make test`
test-slow: $(VENV)/.installed prometheus
	$(PY) -m pytest -q -m slow

## test-torch: the PyTorch adapter of the training loaders, with torch installed into the venv
## (not a dependency of datasetd): a CPU build from TORCH_INDEX, else the registry's torch
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
test-torch: $(VENV)/.installed
	$(PY) -c "import torch" 2>/dev/null \
		|| $(PY) -m pip install --quiet --retries 1 --timeout 20 torch --index-url $(TORCH_INDEX) \
		|| $(PY) -m pip install --quiet torch
	$(PY) -m pytest -q -m torch

## lint: the layers' import rules, the Kubernetes manifests, ruff (lint + format check), mypy --strict
lint: $(VENV)/.installed
	$(PY) -m service.tools.import_rules
	$(PY) -m service.tools.validate_manifests
	$(BIN)/ruff check service sdk tests bench
	$(BIN)/ruff format --check service sdk tests bench
	$(BIN)/mypy service sdk tests bench

## bench: benchmarks, printing figures beside raw limits measured in the same run
# Inputs of bench_search in `make bench` (its own target runs 100,000).
BENCH_SEARCH_N ?= 20000
bench: $(VENV)/.installed
	$(PY) -m bench.bench_datasets
	$(PY) -m bench.bench_ingest
	$(PY) -m bench.bench_versions --large
	$(PY) -m bench.bench_cli_upload
	$(PY) -m bench.bench_faults
	$(PY) -m bench.bench_boundary
	$(PY) -m bench.bench_replicas
	$(PY) -m bench.bench_workers
	$(PY) -m bench.bench_ontology
	$(PY) -m bench.bench_ontology_exports
	$(PY) -m bench.bench_vi_download
	$(PY) -m bench.bench_vi_exports
	$(PY) -m bench.bench_export_media
	$(PY) -m bench.bench_clarifai
	$(PY) -m bench.bench_embedder
	BENCH_SEARCH_N=$(BENCH_SEARCH_N) $(PY) -m bench.bench_search
	$(PY) -m bench.bench_auth

## bench-search: search at the issue's size, 100,000 vectors of 512 dimensions (10-20 minutes)
bench-search: $(VENV)/.installed
	BENCH_SEARCH_N=100000 $(PY) -m bench.bench_search

## bench-auth: the authorization cost per GetDataset call, ListAuditEvents over 1M events (~2-3 minutes)
bench-auth: $(VENV)/.installed
	$(PY) -m bench.bench_auth

## bench-scale: sizes and throughput at 1M inputs for deploy/SCALING.md (15-40 minutes)
bench-scale: $(VENV)/.installed
	$(PY) -m bench.bench_scale

## bench-peers: datasetd beside FiftyOne and Label Studio (installed into .bench/ on first use),
## 10k and 50k items, two interleaved rounds; BENCH_PEERS_SIZES=1000,5000 for a quick run
bench-peers: $(VENV)/.installed
	$(PY) -m bench.bench_peers

clean:
	rm -rf $(VENV) .data build *.egg-info
