# Install into the active Python environment (use a virtual environment if you like).
PYTHON ?= python
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-slow test-gpu test-all lint tensorboard clean

install:  ## CPU torch first (a plain `torch` requirement would pull a multi-GB CUDA build), then rnnlm
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -e ".[dev,export,bpe]"

test:  ## the default, fast suite
	$(PYTHON) -m pytest

test-slow:  ## the long tests only (DDP on CPU, sweeps, longer training)
	$(PYTHON) -m pytest -m slow

test-gpu:  ## the GPU tests (skipped without CUDA; GPU_TEST_DEVICE=cpu: tests/test_gpu.py as a CPU dry run)
	$(PYTHON) -m pytest -m gpu

test-all:
	$(PYTHON) -m pytest -m "slow or not slow"

lint:
	$(PYTHON) -m ruff check src tests benchmarks

tensorboard:  ## localhost only
	tensorboard --logdir outputs --host 127.0.0.1

clean:
	rm -rf outputs .cache .pytest_cache
