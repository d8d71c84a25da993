# The two set-up commands of the README. Both create (or reuse) the virtual environment in .venv/.
#   make run   - the whole pipeline on the toy dataset (teacher + 2 generations), embedded defaults, no server
#   make test  - the test suite (what CI runs through .ci/run)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=25"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/nst run

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf outputs data .pytest_cache
