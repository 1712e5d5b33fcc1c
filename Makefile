# sciddiff developer targets. `make test` is what CI runs (.ci/run).
#
# The virtual environment is built once and re-used: .venv/.installed is a stamp that depends on
# pyproject.toml, so `make test` reinstalls only after pyproject.toml changes (or `make distclean`).
# torch is installed first and pinned to the CPU wheel (PyTorch's `+cpu` build, found on this
# machine's disk through pip's find-links) and kept by a constraints file during the rest of the
# install, so pip never resolves a CUDA build of torch.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0+cpu

.PHONY: help venv demo test lint clean distclean

help:
	@echo "make venv   - create $(VENV) (torch CPU first, then sciddiff[dev], editable)"
	@echo "make demo   - bundled models end to end: molecules (SDF, PNG, metrics) and downscaling (NetCDF, PNG)"
	@echo "make test   - pytest, then ruff"
	@echo "make lint   - ruff only"
	@echo "make clean  - remove results/, caches and build files (keeps $(VENV))"
	@echo "make distclean - clean, and remove $(VENV)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -c $(VENV)/constraints.txt -e ".[dev]"
	@touch $(STAMP)

demo: venv
	$(BIN)/sciddiff demo --out results/demo

test: venv
	$(BIN)/pytest -q
	$(BIN)/ruff check sciddiff tests benchmarks

lint: venv
	$(BIN)/ruff check sciddiff tests benchmarks

clean:
	rm -rf results .pytest_cache .ruff_cache build dist
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
