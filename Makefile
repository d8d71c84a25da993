# The two set-up commands of the README. Both create (or reuse) the virtual environment in .venv/.
#   make run   - the whole pipeline on the toy dataset (teacher + 2 generations), embedded defaults, no server
#   make test  - the test suite (what CI runs through .ci/run); make test-fast skips the slow end-to-end tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# two pytest-xdist workers, a whole test file each at a time; the tests' stages use 1 torch thread each
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: run test test-fast install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=25"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/nst run

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

clean:
	rm -rf outputs data .pytest_cache
