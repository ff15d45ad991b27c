# Two commands set everything up on a fresh machine:
#   make demo   create the virtualenv, migrate SQLite, deliver the seed's post to a local SMTP server
#   make test   create the virtualenv and run the test suite (SQLite; no other service needed)
#   make bench  the benchmark, python -m bench (BENCH_ARGS=--quick for CI's size, about a minute)
#   make host-site  build the wheel and run the host-site test (.ci/host-site)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench host-site clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m project.demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/python manage.py check

bench: $(BIN)/.installed
	$(BIN)/python -m bench $(BENCH_ARGS)

host-site: $(BIN)/.installed
	bash .ci/host-site

clean:
	rm -rf $(VENV) db.sqlite3* .test-db.sqlite3* .pytest_cache test-artifacts
