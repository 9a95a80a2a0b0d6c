# Two entry points on a fresh machine (Python >= 3.10 with venv):
#   make chat   install into .venv and chat with the built-in default model
#   make test   install with the test extras and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: chat test lint install

$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0  # first: the pinned CPU wheel, before anything that depends on torch
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e '.[test]'
	# the oldest official client line (0.x) cannot share a venv with mistralai 3.x
	python3 -m venv $(VENV)/mistralai-0.4.2
	$(VENV)/mistralai-0.4.2/bin/python -m pip install --quiet --disable-pip-version-check mistralai==0.4.2
	touch $@

install: $(VENV)/.runtime

chat: $(VENV)/.runtime
	$(VENV)/bin/mixtral chat

test: $(VENV)/.test
	$(VENV)/bin/ruff check mixtral tests
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: $(VENV)/.test
	$(VENV)/bin/ruff check mixtral tests
	$(VENV)/bin/mypy
