# The Makefile is the contract: every target uses the project's own virtualenv in .venv (made by `make install`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY := weights/tiny
NGPU ?= 2
LOG_RANK ?= 0
ARGS ?=
# pytest-xdist workers for `make test` (each test file stays on one worker: its module fixtures and process groups).
TEST_WORKERS ?= 2
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install check-install demo tiny-weights test test-fast test-dist test-gpu test-cluster lint format docs print-config plan run bench clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

tiny-weights: $(TINY)/.complete

$(TINY)/.complete: $(STAMP)
	$(PY) -m launch.weights make-tiny $(TINY)

# The built-in tiny model on the example portrait and 5 s of speech -> outputs/demo.mp4 (with sound).
demo: install tiny-weights
	mkdir -p outputs
	$(PY) -m launch.generate model=tiny weights=$(TINY) image=examples/portrait.jpg audio=examples/speech_5s.wav \
		prompt="A woman speaks to the camera." output=outputs/demo.mp4 overwrite=true $(ARGS)

# A real non-editable install: the wheel in a fresh venv renders the tiny demo from a folder outside the checkout.
check-install: install
	PY=$(abspath $(PY)) bash .ci/check_install.sh

# Everything CI runs: tier 1 (unit), tier 2 (multi-rank gloo), cluster (local Slurm; skips where it cannot start).
test: install
	$(PY) -m pytest -q -m "not gpu" -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-fast: install
	$(PY) -m pytest -q tests/unit $(ARGS)

test-dist: install
	$(PY) -m pytest -q tests/dist $(ARGS)

test-cluster: install
	$(PY) -m pytest -q tests/cluster $(ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# docs/config.md is generated from the typed config's declarations (tests/unit/test_config_doc.py fails when stale).
docs: install
	$(PY) -m avatar.config_doc --write docs/config.md

print-config: install
	$(PY) -m launch.config $(ARGS)

plan: install
	$(PY) -m launch.plan $(ARGS)

# torchrun on this machine: make run NGPU=2 ARGS="model=tiny weights=weights/tiny image=... audio=... output=..."
run: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NGPU) --local-ranks-filter=$(LOG_RANK) -m launch.generate $(ARGS)

bench: install tiny-weights
	$(PY) bench/comm_bench.py
	$(PY) bench/long_memory_bench.py
	$(PY) bench/memory_model.py
	$(PY) bench/dit_bench.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
