# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install what they need. torch==2.13.0 (the CPU build on this
# machine's disk) is installed first so that no install step can pull a CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
OUT    ?= out

.PHONY: demo data test test-slow bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[all]"
	@touch $(STAMP)

# Fashion-MNIST from Debian's package dataset-fashion-mnist: installed when running as root,
# otherwise the exact command is printed and the demo stops.
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

data:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else \
	  echo "Fashion-MNIST is missing. Install it with:"; \
	  echo "    sudo apt-get install dataset-fashion-mnist"; \
	  exit 1; \
	fi

demo: $(STAMP) data
	$(PY) -m convspec reproduce guo-fig41 --out $(OUT)/guo_fig41
	$(PY) -m convspec compare --config configs/demo_fmnist.toml --out $(OUT)/compare

test: $(STAMP)
	$(PY) -m pytest -m "not slow" --doctest-modules src/convspec tests

test-slow: $(STAMP)
	$(PY) -m pytest -m slow tests

# Runs every benchmark, then rewrites the README's tables from
# benchmarks/results/*.json; `$(PY) benchmarks/readme_tables.py --check` only compares them.
bench: $(STAMP)
	$(PY) benchmarks/penalty.py --out benchmarks/results --threads 1
	$(PY) benchmarks/svb.py --out benchmarks/results
	$(PY) benchmarks/spectrum.py --out benchmarks/results
	$(PY) benchmarks/fft.py --out benchmarks/results
	$(PY) benchmarks/regularizer.py --out benchmarks/results --threads 1
	$(PY) benchmarks/readme_tables.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
