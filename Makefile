# Two commands: `make run` (set up and serve) and `make test` (set up and run every check).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# Daphne drops a WebSocket whose message exceeds this many bytes before buffering it. Same as
# the chat consumer's own limit (CHAT_MAX_FRAME_BYTES), which protects hosts that run daphne
# with its 1 MiB default by answering `too_large`.
WS_MAX_BYTES ?= 65536

.PHONY: run setup setup-dev migrate demo test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

setup: $(VENV)/.runtime migrate demo

setup-dev: $(VENV)/.dev

migrate: $(VENV)/.runtime
	$(BIN)/python manage.py migrate --no-input -v 0

demo: migrate
	$(BIN)/python manage.py chat_demo

# Daphne through our runner (realtime_kit/server.py): SIGTERM or Ctrl-C drains (WebSockets
# closed with 1012, streams ended, at most DRAIN_SECONDS) instead of cutting everything, and
# HTTP requests are bounded (headers within 10 s, bodies up to 4 MiB). docs/deployment.md.
DRAIN_SECONDS ?= 10

# The runner prints "ready: serving http://…" once the port listens (not before).
run: setup
	@echo "Starting the server on $(HOST):$(PORT)…"
	exec $(BIN)/python -m realtime_kit.server -b $(HOST) -p $(PORT) \
		--websocket-max-message-size $(WS_MAX_BYTES) --drain-timeout $(DRAIN_SECONDS) \
		project.asgi:application

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The whole suite on daphne (through our runner), then the end-to-end tests again on uvicorn:
# the apps must work unchanged on both (tests marked daphne_only test daphne's own behaviour).
test: setup-dev lint
	$(BIN)/python manage.py check
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	TEST_ASGI_SERVER=uvicorn $(BIN)/python -m pytest -m e2e \
		--ignore=tests/test_host_matrix.py --ignore=tests/test_packaging.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) db.sqlite3* test.sqlite3* staticfiles .pytest_cache .mypy_cache .ruff_cache
