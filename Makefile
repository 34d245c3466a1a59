# franca: `make demo` (the main job) and `make test` are all a newcomer needs.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# compiled bytecode caches cut every test process's start-up by ~15 s (torch, torchvision)
export PYTHONDONTWRITEBYTECODE :=
EXTRAS ?= dev,all
PYTEST_ARGS ?=

.PHONY: venv test lint format demo clean bench

# Create .venv with uv (installed with pip when missing) and install franca editable under the pinned constraints.
$(VENV)/.installed: pyproject.toml constraints.txt
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@test -x $(PY) || python3 -m uv venv --quiet $(VENV) --python python3
	python3 -m uv pip install --quiet --python $(PY) -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

format: venv
	$(PY) -m ruff check --fix src tests benchmarks
	$(PY) -m ruff format src tests benchmarks

demo: venv
	$(VENV)/bin/franca demo --output-dir runs/demo

bench: venv
	$(PY) benchmarks/bench_inference.py

clean:
	rm -rf runs .pytest_cache
