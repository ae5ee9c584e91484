# Two entry points on a fresh machine: `make demo` and `make test` (both set up .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.built
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h) setup.py pyproject.toml requirements.txt

.PHONY: demo test bench setup cuda-check

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	FORCE_ONLY_CPU=1 MAX_JOBS=2 $(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mini-unlearn demo --json demo.json --plot demo.png

test: $(STAMP)
	MINI_UNLEARN_REQUIRE_NATIVE=1 $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/mini-unlearn bench kernels --json bench_kernels.json --plot bench_kernels.png
	$(BIN)/mini-unlearn bench unlearn --json bench_unlearn.json --plot bench_unlearn.png

cuda-check:
	bash .ci/cuda_check.sh
