# Two commands for a newcomer:  `make lab` (JupyterLab on the example notebooks)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS := notebook,tf,serve,ray,chains,docs,test

.PHONY: install browser truss-server lab test check-examples test-under-load bench docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("truss_lab needs Python >= 3.11, found " + sys.version.split()[0] if sys.version_info < (3, 11) else 0)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

lab: install
	$(BIN)/python -m truss_lab.devtools.lab

# The widget test drives Debian's chromium (never `playwright install`): get it with apt where we can.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "note: no chromium and no apt-get here; the browser test will be skipped (install chromium to run it)"; fi; }

# The real Truss server (the oracle of tests/conformance), in venvs of its own, cached in ~/.cache/truss_lab
# ($$TRUSS_LAB_CACHE), with every requirements overlay the examples' checks install: the tests run offline.
truss-server: install
	$(BIN)/python -m truss_lab.serving.prepare examples

test: install browser truss-server
	$(BIN)/python -m pytest
	$(MAKE) check-examples
	$(MAKE) test-under-load

# The timing-sensitive tests and notebook 03 again, while busy processes load every core: what they
# assert is what the design guarantees, so it must hold on a busy machine too.
test-under-load: install
	$(BIN)/python -m truss_lab.devtools.under_load -- $(BIN)/python -m pytest -q -p no:cacheprovider \
	  tests/test_examples.py tests/test_lock.py tests/test_runner.py tests/test_hardening.py notebooks/03-gpu-lock.ipynb

# `truss-lab check` on every example truss: each must behave on the real Truss server as it does here.
check-examples: install truss-server
	@for t in examples/*/; do [ -f $$t/config.yaml ] || continue; echo "== truss-lab check $$t"; $(BIN)/truss-lab check $$t || exit 1; done
	@# and every example chain and single-file model (*_chain.py, *_model.py), wired on the real Truss servers
	@for c in examples/*/*_chain.py examples/*/*_model.py; do [ -f $$c ] || continue; echo "== truss-lab check $$c"; $(BIN)/truss-lab check $$c || exit 1; done
	@# and each example truss's examples as tests, against its snapshot, through truss_lab's pytest plugin
	@# (rounded percentages: 1e-3 absorbs another CPU's rounding)
	$(BIN)/python -m pytest -q -p no:cacheprovider --truss-rtol 1e-3 $$(for t in examples/*/; do [ -f $$t/examples.yaml ] && echo --truss $$t; done)

# The docs site (docs/, MkDocs Material) into site/, offline; --strict: a broken link or reference fails it.
# `make test` builds it too (tests/test_docs.py) and runs every Python block of docs/ and README.md.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	@echo "the docs are in site/: open site/index.html"

bench: install
	$(BIN)/python benchmarks/run_all.py --update-docs

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts .lab site
