# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CIFAR-10 copy (ImageFolder layout in a tar.gz); override on the command line or environment.
PPVIT_CIFAR10 ?= $(abspath ../shared/datasets/cifar10-jpeg.tar.gz)
export PPVIT_CIFAR10
# ImageNet ViT-Ti/16 weights (timm's vit_tiny_patch16_224 state dict) for the demo, cpu and gpu presets.
PPVIT_WEIGHTS ?= $(abspath ../shared/weights/vit_tiny_patch16_224.safetensors)
export PPVIT_WEIGHTS

.PHONY: venv demo test test-slow lint bench

venv: $(VENV)/.installed

# torch and torchvision pinned to the releases this project is tested with.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-cache-dir torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check --no-cache-dir -e '.[dev,serve,data,track]'
	touch $@

# The paper's comparison at CPU scale, reduced (12 min 28 s on one EPYC core in fp32; it prints its own
# estimate first and trains on fewer images where it would exceed 12 minutes); rerun to continue.
demo: venv
	$(VENV)/bin/ppvit reproduce --preset demo --data "$(PPVIT_CIFAR10)" --out demo-out

# Two pytest workers with one torch thread each (pytest-xdist; a module's tests stay in one worker, which
# keeps its fixtures): 8m34s against 12m01s in one process with two threads (2 vCPU EPYC, BENCHMARKS.md).
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile --durations=15

test-slow: venv
	$(PY) -m pytest -q -m slow

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: venv
	$(PY) benchmarks/bench_encrypt.py
