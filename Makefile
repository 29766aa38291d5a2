# Two commands for a newcomer:  `make lab` (JupyterLab on the example notebooks)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS := notebook,tf,test

.PHONY: install lab test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("truss_lab needs Python >= 3.11, found " + sys.version.split()[0] if sys.version_info < (3, 11) else 0)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

lab: install
	$(BIN)/python -m truss_lab.lab

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/run_all.py --update-readme

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
