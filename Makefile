# The two commands of the README: `make demo` and `make test`. Each builds the
# virtual environment from pyproject.toml first (once; again when it changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Huge pages for malloc: ~85 ms/step less page-fault time on CPU (docs/cpu_performance.md).
export GLIBC_TUNABLES := glibc.malloc.hugetlb=1

.PHONY: demo test bench clean chromium

$(BIN)/mmjax: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps 'jax2onnx==0.17.1'
	touch $@

demo: $(BIN)/mmjax
	$(BIN)/mmjax demo --workdir $${WORKDIR:-workdirs/demo}

# The headless browser of tests/test_serve_browser.py: Debian's chromium and its driver
# (as root; playwright's own browser download is not reachable everywhere).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@(command -v chromium && command -v chromedriver) >/dev/null || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver)

test: $(BIN)/mmjax chromium
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25 tests

bench: $(BIN)/mmjax
	$(BIN)/pip install -q 'torch==2.13.0' 'transformers>=5'
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) workdirs

# Wheels for the lent GPU machine (scripts/device/bench.sh): the packages of
# scripts/device/wheels.txt that its image lacks, for its CPython 3.12 on x86-64.
# Downloaded again only when the list changes (one version of each, or pip refuses).
DEVICE_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
.PHONY: device-wheels
device-wheels: .whl/.stamp

.whl/.stamp: scripts/device/wheels.txt
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp $(addprefix --platform ,$(DEVICE_PLATFORMS)) -d .whl \
	  -r scripts/device/wheels.txt
	@du -sh .whl
	touch $@
