# The two commands of the README: `make demo` and `make test`. Each builds the
# virtual environment from pyproject.toml first (once; again when it changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Huge pages for malloc: ~85 ms/step less page-fault time on CPU (docs/cpu_performance.md).
export GLIBC_TUNABLES := glibc.malloc.hugetlb=1

.PHONY: demo test bench clean

$(BIN)/mmjax: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps 'jax2onnx==0.17.1'
	touch $@

demo: $(BIN)/mmjax
	$(BIN)/mmjax demo --workdir $${WORKDIR:-workdirs/demo}

test: $(BIN)/mmjax
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

bench: $(BIN)/mmjax
	$(BIN)/pip install -q 'torch==2.13.0' 'transformers>=5'
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) workdirs
