# Two entry points on a fresh machine (Python >= 3.10 with venv):
#   make serve  install into .venv and serve the chat API + web page on the default model
#   make test   install with the test extras and run the whole test suite
# (make chat: the same install, then an interactive chat in the terminal)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: serve chat test lint install browser

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

serve: $(VENV)/.runtime
	$(VENV)/bin/mixtral serve $(ARGS)

chat: $(VENV)/.runtime
	$(VENV)/bin/mixtral chat $(ARGS)

# The page tests drive Debian's Chromium (never a downloaded browser), and one test runs the
# main job on an emulated AVX2 CPU with Debian's qemu-user; install them if we can.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  >/dev/null; } || echo "note: no chromium; the web-page tests will be skipped"
	@command -v qemu-x86_64 >/dev/null || [ "$$(uname -m)" != x86_64 ] || { [ "$$(id -u)" = 0 ] \
	  && command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq qemu-user >/dev/null; } || echo "note: no qemu-user; the emulated-CPU test will be skipped"

test: $(VENV)/.test browser
	$(VENV)/bin/ruff check mixtral tests scripts benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: $(VENV)/.test
	$(VENV)/bin/ruff check mixtral tests scripts benchmarks
	$(VENV)/bin/mypy
