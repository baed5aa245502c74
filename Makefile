# Vitrine: `make run` (the web UI over the embedded default store) and `make test` set themselves up.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INDEX ?= vitrine-data/index
PYTEST_ARGS ?=

.PHONY: setup setup-dev run test test-fast lint format bench browser clean

$(VENV)/.main: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.main requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.main
setup-dev: $(VENV)/.dev

# The main job: build (or update) the index from CATALOG when given, then serve the UI and API.
run: setup
	@if [ -n "$(CATALOG)" ]; then $(BIN)/python -m indexer build "$(CATALOG)" --index "$(INDEX)"; fi
	$(BIN)/python -m app --index "$(INDEX)"

# Debian's Chromium drives the browser tests (never `playwright install`: no browser downloads here).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: browser tests will be skipped"

test: setup-dev browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The edit loop: everything but the tests marked slow in tests/conftest.py (no browser needed).
test-fast: setup-dev
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup-dev
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/search.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
