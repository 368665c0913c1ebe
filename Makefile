# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv with the pinned torch 2.14.1 / torchvision 0.29.1 and the CPU extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edge-ssl-installed

.PHONY: install demo test lint docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[cpu,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edge-ssl demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Regenerate docs/cli-reference.md from the CLI (tests/test_docs.py fails when it is stale).
docs: $(STAMP)
	$(BIN)/python docs/gen_cli.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) edge-ssl-demo .pytest_cache
