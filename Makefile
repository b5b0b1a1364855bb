# twostep: `make demo` (set up + main job), `make test` (set up + tests). Both create .venv when absent.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh $(VENV)

demo: install
	$(VENV)/bin/twostep demo --out out/demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider
