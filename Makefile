PYTHON ?= python3

.PHONY: install demo test lint bench

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -r requirements-embedded.txt

demo: install
	$(PYTHON) ecpo.py

test: install
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench: install
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) bench/bench_ailo.py
	$(PYTHON) bench/bench_ecpo_dpo.py
	$(PYTHON) bench/bench_grsu_scoring.py
	$(PYTHON) bench/bench_memory.py
	$(PYTHON) bench/bench_smtpo_grpo.py
	$(PYTHON) bench/bench_rso.py
