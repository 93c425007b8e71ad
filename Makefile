# Two set-up commands: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	# torch first, pinned to the build that lies on this machine's disk
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --out runs/demo

# The suite runs in a random order (pytest-randomly, a dev extra) so that no test leans on another;
# the order's seed is printed first, and `make test SEED=N` repeats that order.
ifndef SEED
SEED := $(shell $(PYTHON) -c 'import random; print(random.randrange(2**31))')
endif

test: $(STAMP)
	@echo "test order: make test SEED=$(SEED) repeats it"
	$(BIN)/python -m pytest -q -p randomly --randomly-seed=$(SEED) tests

bench: $(STAMP)
	$(BIN)/python scripts/benchmark.py losses

clean:
	rm -rf $(VENV) runs build *.egg-info
