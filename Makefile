# Quick start: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

venv: $(STAMP)

# Everything comes from requirements/lock.txt with --no-deps: exact, no resolver backtracking. torch is the CPU
# build that pip finds on local disk; k-diffusion 0.0.15 (the test oracle) must not pull its declared deps.
# requirements/gpu_compile.txt (XLA:GPU's compiler, for bench/gpu_program.py) goes to its own folder, off sys.path.
$(STAMP): requirements/lock.txt requirements/gpu_compile.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements/lock.txt
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/gpu-compile -r requirements/gpu_compile.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# One pytest worker per core (pytest-xdist), each test file on one worker (module fixtures are built once). The suite
# is CPU-bound (XLA compilation, the CLI runs); on the 2-core CI VM it took 15.5-16 min, and 12-14 min since it
# compiles at XLA:CPU's backend optimisation level 0 (tests/conftest.py; bench/RESULTS.md, session 19); with
# session 20's tests of bad input, 14.5 min.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile $(PYTEST_ARGS)

# The demo: train configs/demo.py on the bundled digits (about 3 minutes on 2 CPU cores; the loss falls from ~1.5 to
# ~0.2 and the grids show digit shapes), then sample a grid from the EMA weights with sample.py. Re-running resumes.
DEMO_STEPS ?= 1200
demo: $(STAMP)
	$(PY) train.py --config configs/demo.py --name demo --batch-size 32 --end-step $(DEMO_STEPS) \
		--demo-every 400 --save-every 400 --sample-n 64
	$(PY) sample.py --checkpoint runs/demo --sampler dpmpp_2m --steps 50 -n 64 --grid --video \
		--prefix runs/demo/samples/digit
	@echo "demo outputs: runs/demo/samples/digit_grid.png (samples), runs/demo/samples/digit_trajectory.gif," \
		"runs/demo/demo_*.png (grids during training), runs/demo/metrics.csv and runs/demo/tb (tensorboard --logdir runs)"

clean:
	rm -rf $(VENV) build *.egg-info
