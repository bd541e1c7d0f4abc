# Everything runs in a project virtual environment, .venv (or the one already active), so that the two README
# commands work where the system Python is "externally managed" (PEP 668: current Debian and Ubuntu). The venv sees
# the system's site-packages: what is installed there already is not installed again. Debian and Ubuntu need the
# python3-venv package for `python3 -m venv`.
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON := $(VENV)/bin/python
RUN := PATH="$(abspath $(VENV))/bin:$$PATH" $(PYTHON)

.PHONY: install demo test lint bench data

$(PYTHON):
	python3 -m venv --system-site-packages $(VENV)

install: $(PYTHON)
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -r requirements-embedded.txt

demo: install
	$(RUN) ecpo.py

# the real datasets from their public sources, checked (common/fetch_data.py): make data DATASET=inspired
DATASET ?= all
DATA_DIR ?= ../shared/data
data: install
	$(RUN) -m common.fetch_data $(DATASET) --data-dir $(DATA_DIR)

# pytest-xdist workers (0: one process). On the 2-core machine two take as long as one process (950 s both); more
# cores would give each its own (not measured). Each needs about 3 GiB of memory.
TEST_WORKERS ?= 2
test: install
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(RUN) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15 tests

lint:
	$(MAKE) --no-print-directory $(PYTHON)
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench: install
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(RUN) bench/bench_ailo.py
	$(RUN) bench/bench_ecpo_dpo.py
	$(RUN) bench/bench_grsu_scoring.py
	$(RUN) bench/bench_memory.py
	$(RUN) bench/bench_smtpo_grpo.py
	$(RUN) bench/bench_rso.py
