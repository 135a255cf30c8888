# The README's two commands: `make test` and `make demo`. Both create their own environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
FMNIST_CACHE ?= $(HOME)/.cache/swin_ssl/fashion-mnist
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Installs skip byte-compiling 17,000 files, most never imported (half the install); first imports write .pyc.
unexport PYTHONDONTWRITEBYTECODE
OBJECTIVE ?= moby
DEMO_DIR ?= runs/demo_$(OBJECTIVE)

.PHONY: install fmnist test test-fast demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e ".[test]"
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist: installed system-wide as root, else unpacked
# into a user cache with apt-get download + dpkg-deb (no root needed).
fmnist:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FMNIST_CACHE)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST present"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist || \
	   (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	else \
	  $(PY) -m swin_ssl.data.fashion_mnist --fetch --cache $(FMNIST_CACHE); \
	fi

# The suite simulates 8 devices on the CPU (tests/conftest.py sets the flags). Its processes mostly compile or
# import on one thread: two pytest workers (pytest-xdist) keep two cores busy; each test file stays on one worker
# so its module fixtures run once, in the order tests/conftest.py gives (the longest files first).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: install fmnist
	$(PYTEST) tests

# The iteration tier: everything but the tests marked slow (pytest.ini).
test-fast: install fmnist
	$(PYTEST) -m "not slow" tests

demo: install fmnist
	$(PY) -m swin_ssl.demo --objective $(OBJECTIVE) --workdir $(DEMO_DIR)

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
