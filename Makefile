# One entry point for every habit. The virtual environment is made on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint protos check-protos venv clean bench bench-quick bench-load bench-faults bench-chaos bench-dashboard gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Start a local cluster (2 x GPU=2, 1 x MEMORY=100e9) and run the seed pipeline.
demo: $(STAMP)
	$(BIN)/python examples/seed_pipeline.py

## The test suite (unit, in-process gRPC, and end-to-end with real processes).
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

## apportion vs Dask distributed side by side (3 interleaved rounds, medians),
## then the placement micro-benchmark. Dask is installed only here.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --rounds 3
	$(BIN)/python -m bench.placement
	$(BIN)/python -m bench.dashboard --rounds 3

## The throughput workload with the dashboard off, on, its stream read, and
## open in headless Chromium (3 interleaved rounds): what the page costs.
bench-dashboard: $(STAMP)
	$(BIN)/python -m bench.dashboard --rounds 3

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --rounds 1 --quick
	$(BIN)/python -m bench.placement --budget 1

## 100,000 tasks queued by 20 client processes, then run by 2 workers x 2 threads:
## scheduler memory per queued task, submit and completion rates, every result
## checked. No Dask needed. BENCH_LOAD_ARGS=--quick for a small run.
bench-load: $(STAMP)
	$(BIN)/python -m bench.load $(BENCH_LOAD_ARGS)

## How long each kind of fault takes to notice and get over (frozen worker,
## killed scheduler restarted from its state dir, killed client).
bench-faults: $(STAMP)
	$(BIN)/python -m bench.faults

## 20,000 tasks from 4 clients while workers are killed, frozen, retired and
## added and the scheduler is killed and restarted; checks every result, the
## books and that no worker ran beyond what it declared (BENCH_CHAOS_ARGS=...).
bench-chaos: $(STAMP)
	$(BIN)/python -m bench.chaos $(BENCH_CHAOS_ARGS)

## On a machine with NVIDIA GPUs: GPU=auto matches the machine, and each task
## allocates on the device it was given (torch or cupy where installed). Not
## part of `make test`, which fakes the devices.
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Regenerate the Python code for protos/apportion.proto (committed).
protos: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -I . \
		--python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
		protos/apportion.proto

## Fail when the committed generated code differs from what protoc makes now.
check-protos: $(STAMP)
	@tmp=$$(mktemp -d) && \
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -I . \
		--python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp \
		protos/apportion.proto && \
	for f in apportion_pb2.py apportion_pb2.pyi apportion_pb2_grpc.py apportion_pb2_grpc.pyi; do \
		diff -u protos/$$f $$tmp/protos/$$f || { echo "protos/$$f is stale: run 'make protos'"; exit 1; }; \
	done; rm -rf $$tmp; echo "generated code matches protos/apportion.proto"

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
