# Quick start: `make demo` (arrives with the training issue) and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

venv: $(STAMP)

# Everything comes from requirements/lock.txt with --no-deps: exact, no resolver backtracking. torch is the CPU
# build that pip finds on local disk; k-diffusion 0.0.15 (the test oracle) must not pull its declared deps.
$(STAMP): requirements/lock.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements/lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo:
	@echo "make demo arrives with the training issue (train.py on the bundled digits); see README.md"; exit 1

clean:
	rm -rf $(VENV) build *.egg-info
