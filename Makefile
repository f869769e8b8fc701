# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install what they need. torch==2.13.0 (the CPU build on this
# machine's disk) is installed first so that no install step can pull a CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
OUT    ?= out

.PHONY: demo test test-slow bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[all]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m convspec reproduce guo-fig41 --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" --doctest-modules src/convspec tests

test-slow: $(STAMP)
	$(PY) -m pytest -m slow tests

bench: $(STAMP)
	$(PY) benchmarks/penalty.py --out benchmarks/results
	$(PY) benchmarks/svb.py --out benchmarks/results

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
