# The commands the README names. Each target sets up what it needs first (a virtualenv in .venv), so
# `make demo` and `make test` work on a fresh clone.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0. From PyPI on Linux that is the multi-GB CUDA build; TORCH_INDEX=https://download.pytorch.org/whl/cpu
# installs the CPU build instead (this project's machines find it on local disk through pip's own config). On a GPU
# machine with torch already installed, use `make test VENV_FLAGS=--system-site-packages TORCH_SPEC=` to keep its torch.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
VENV_FLAGS ?=
STAMP := $(VENV)/.fastdiff-installed
RUN ?= runs/mnist5k

.PHONY: setup demo distill-demo pretrained test test-all test-slow lint bench clean ext ext-test ext-cuda-check \
	image-check gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Train the mnist5k preset (real MNIST digits) on the CPU, sample a grid with a trajectory figure, and print
# FD_cls, KID, precision/recall and accuracy. A run already in $(RUN) is kept: set RUN=runs/other for a new one.
demo: setup
	test -d $(RUN)/checkpoints || $(BIN)/fastdiff train --preset mnist5k --out $(RUN)
	$(BIN)/fastdiff sample --checkpoint $(RUN) --n 100 --out $(RUN)/samples.png --trajectory
	$(BIN)/fastdiff eval --checkpoint $(RUN) --n 1000

# ADD: distil the mnist5k teacher (by default the shipped pretrained:mnist; TEACHER=runs/mnist5k distils the
# demo's run, trained first unless it already holds one) into a 1-4 step student, train a refiner for it, and
# write the README's table (FD_cls, accuracy, images/s) to $(STUDENT)/table.md.
TEACHER ?= pretrained:mnist
STUDENT ?= runs/mnist5k-student
REFINER ?= runs/mnist5k-refiner
# 500 refiner steps keep the demo near 30 minutes on 2 cores (2.9 min instead of 8.4); the 1-step student then
# refines to FD_cls 1.58x the floor instead of 1500 steps' 1.38x (README, "Few-step students").
REFINER_STEPS ?= 500
distill-demo: setup
	case "$(TEACHER)" in pretrained:*) ;; *) test -d $(TEACHER)/checkpoints || \
		$(BIN)/fastdiff train --preset mnist5k --out $(TEACHER) ;; esac
	rm -rf $(STUDENT) $(REFINER)
	$(BIN)/fastdiff distill --teacher $(TEACHER) --out $(STUDENT) --no-progress
	$(BIN)/fastdiff train-refiner --checkpoint $(STUDENT) --out $(REFINER) --steps $(REFINER_STEPS) --no-progress
	$(BIN)/python -m fastdiff.distill_table --teacher $(TEACHER) --student $(STUDENT) --refiner $(REFINER) \
		--n 1000 --out $(STUDENT)/table.md

# The weights shipped in fastdiff/pretrained/ (fp16, with the evaluation classifier and each model's eval.json):
# the demo's teacher as pretrained:mnist, and its ADD student as pretrained:mnist-student when asked
# (PRETRAINED_STUDENT=runs/mnist5k-student, with PRETRAINED_TEACHER=no when it distils the shipped teacher, as the
# shipped one does; README "Few-step students").
# A refiner of the shipped student ships as pretrained:mnist-student-refiner when asked (PRETRAINED_REFINER=DIR, a
# `fastdiff train-refiner --checkpoint pretrained:mnist-student` run); PRETRAINED_TEACHER=no ships it alone.
PRETRAINED_STUDENT ?=
PRETRAINED_REFINER ?=
PRETRAINED_TEACHER ?= yes
pretrained: setup
	if [ "$(PRETRAINED_TEACHER)" = yes ]; then test -d $(RUN)/checkpoints || $(MAKE) demo; fi
	$(BIN)/python -m fastdiff.interop.pretrained $(if $(filter yes,$(PRETRAINED_TEACHER)),--teacher $(RUN)) \
		$(if $(PRETRAINED_STUDENT),--student $(PRETRAINED_STUDENT)) $(if $(PRETRAINED_REFINER),--refiner $(PRETRAINED_REFINER))

# The suite CI runs (tests marked slow excluded; `make test-all` includes them).
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

# The tests marked slow alone (about a minute on 2 cores): the two-process DDP run and resume, the GPU suite's
# dry run. CI runs them after `make test`.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The benchmark suite (ops, end-to-end sampling and training per provider): `make bench BENCH_FLAGS=--quick`.
BENCH_FLAGS ?=
bench: setup
	$(BIN)/fastdiff bench $(BENCH_FLAGS)

lint: setup
	$(BIN)/ruff check fastdiff tests benchmarks

# The optional native extension fastdiff._C (kernels/, CMakeLists.txt), built in place into fastdiff/ with the
# venv's torch; the CUDA kernels too when a CUDA toolkit and a CUDA torch are present. One compile job by default
# (EXT_JOBS=4 for more); extra cmake options in CMAKE_ARGS, e.g. CMAKE_ARGS=-DFASTDIFF_CUDA=OFF.
EXT_BUILD ?= build/ext
EXT_JOBS ?= 1
CMAKE_ARGS ?=

ext: setup
	cmake -S . -B $(EXT_BUILD) -DPython_EXECUTABLE=$(abspath $(BIN)/python) -DFASTDIFF_BUILD_TESTS=ON $(CMAKE_ARGS)
	cmake --build $(EXT_BUILD) -j $(EXT_JOBS)

# The accuracy check of the vectorised math (all 2^23 uniforms), then the op tests against the reference.
ext-test: ext
	$(EXT_BUILD)/fastdiff_vecmath_check
	$(BIN)/python -c "import sys; from fastdiff.ops import native; sys.exit(native.load_error())"  # refused: fail, not skip
	$(BIN)/python -m pytest -q tests/ops/test_native.py

# Compile the CUDA kernels with nvcc and their torch-facing wrapper against the venv's torch headers, without
# linking (no CUDA torch, no GPU needed): what CI checks on a CPU machine.
ext-cuda-check: setup
	cmake -S . -B build/cuda-check -DFASTDIFF_CUDA_KERNELS_ONLY=ON -DPython_EXECUTABLE=$(abspath $(BIN)/python) $(CMAKE_ARGS)
	cmake --build build/cuda-check -j $(EXT_JOBS)

# The test suite on the lent GPU machines' Python, torch and Triton before any GPU time is spent: python3.12 where it
# runs (else IMAGE_PYTHON), torch 2.11.0 (a CUDA build, which runs on the CPU here) and Triton 3.6.0, in a venv of
# its own in build/image-venv (about 5 GB; not part of CI). `make test`'s tests then include every Triton launch
# compiled ahead of time for sm_90 and the kernels under the interpreter. The native extension built for the main
# venv's torch is refused there (its tests skip).
IMAGE_PYTHON ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || echo $(PYTHON))
IMAGE_TORCH ?= 2.11.0
IMAGE_TRITON ?= 3.6.0
IMAGE_VENV ?= build/image-venv
image-check:
	test -x $(IMAGE_VENV)/bin/python || $(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install --quiet "torch==$(IMAGE_TORCH)" "triton==$(IMAGE_TRITON)" -e ".[test]"
	$(IMAGE_VENV)/bin/python -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", \
		torch.__version__, "triton", triton.__version__)'
	$(IMAGE_VENV)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

# The wheels benchmarks/gpu_suite.sh installs on the GPU machine, which has no network (carry .whl with the call):
# diffusers for its rows, for the image's Python 3.12
gpu-wheels: setup
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform any -d .whl "diffusers==0.42.1"
	ls .whl

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache fastdiff/_C*.so fastdiff/_C.json
