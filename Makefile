# The two front-door commands: `make demo` and `make test`. Both create (or reuse) .venv
# and install qsurgeon with every extra, pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qsurgeon-installed

.PHONY: demo test install bench clean

# Done once (and again when pyproject.toml or constraints.txt change): say so, as pip is quiet.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || { echo "make: creating the virtual environment $(VENV) (once)"; $(PYTHON) -m venv $(VENV); }
	@echo "make: installing qsurgeon with every extra into $(VENV), pinned by constraints.txt (torch, transformers, ...;"
	@echo "      once, a few minutes; later runs reuse it)"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all,dev]" -c constraints.txt
	@touch $(STAMP)
	@echo "make: installed into $(VENV)"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qsurgeon demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info
