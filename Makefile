# Two entry points a newcomer needs: `make demo` (pre-train on Fashion-MNIST and evaluate) and `make test`.
# Both create the virtual environment and install the data set on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data browser demo test lint types check mutants clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Debian ships the full Fashion-MNIST; installing it needs root (CI runs as root).
data: $(DATA)
$(DATA):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

# Headless Chromium renders the HTML run report in tests/visualize (Debian package, root).
browser: /usr/bin/chromium
/usr/bin/chromium:
	apt-get update -qq && apt-get install -y -qq chromium

demo: install data
	$(VENV)/bin/sopvit demo

# pytest exits 5 when it collected no test: that must fail, never pass silently.
test: install data browser
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check src tests benchmarks tools hubconf.py
	$(VENV)/bin/ruff format --check src tests benchmarks tools hubconf.py

types: install
	$(VENV)/bin/mypy

check: lint types test

# Mutation testing of sop/, train/, data/ and the eval metrics (mutmut; not part of CI): mutants/survivors.txt
# lists what survived. Each package's mutants meet its own tests; see tools/mutants.py and README.
mutants: install
	$(PY) tools/mutants.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache mutants
