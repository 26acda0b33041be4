# The commands the README names. Each target sets up what it needs first (a virtualenv in .venv), so
# `make demo` and `make test` work on a fresh clone.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch: a plain `pip install torch` would pull a multi-GB CUDA build. On a GPU machine with
# torch already installed, use `make test VENV_FLAGS=--system-site-packages TORCH_SPEC=` to keep its torch.
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
STAMP := $(VENV)/.fastdiff-installed
RUN ?= runs/digits

.PHONY: setup demo distill-demo test test-all lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Train the digits preset on the CPU, sample a grid with a trajectory figure, and print FD_cls and accuracy.
demo: setup
	rm -rf $(RUN)
	$(BIN)/fastdiff train --preset digits --out $(RUN)
	$(BIN)/fastdiff sample --checkpoint $(RUN) --n 100 --out $(RUN)/samples.png --trajectory
	$(BIN)/fastdiff eval --checkpoint $(RUN) --n 1000

# ADD: distil a v-prediction digits teacher (trained first unless $(TEACHER) already holds a run) into a 1-4 step
# student, train a refiner for it, and write the README's table (FD_cls, accuracy, images/s) to $(STUDENT)/table.md.
TEACHER ?= runs/digits-v
STUDENT ?= runs/digits-v-student
REFINER ?= runs/digits-v-refiner
distill-demo: setup
	test -d $(TEACHER)/checkpoints || $(BIN)/fastdiff train --preset digits-v --out $(TEACHER)
	rm -rf $(STUDENT) $(REFINER)
	$(BIN)/fastdiff distill --teacher $(TEACHER) --out $(STUDENT) --no-progress
	$(BIN)/fastdiff train-refiner --checkpoint $(STUDENT) --out $(REFINER)
	$(BIN)/python -m fastdiff.distill_table --teacher $(TEACHER) --student $(STUDENT) --refiner $(REFINER) \
		--n 1000 --out $(STUDENT)/table.md

# The suite CI runs (tests marked slow excluded; `make test-all` includes them).
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

# The benchmark suite (ops, end-to-end sampling and training per provider): `make bench BENCH_FLAGS=--quick`.
BENCH_FLAGS ?=
bench: setup
	$(BIN)/fastdiff bench $(BENCH_FLAGS)

lint: setup
	$(BIN)/ruff check fastdiff tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
