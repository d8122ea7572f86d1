# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
# GPU users: make install TORCH="torch==2.14.1 torchvision==0.29.1 --index-url ..."
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-fast bench clean
install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps hydra-optuna-sweeper==1.3.0   # see pyproject.toml (optuna pin)
	touch $(STAMP)

# A tiny Gemma 3 learns to read receipts into CORD-v2 JSON (conf/experiment/receipts_demo.yaml: ~70 s of
# training on 2 idle cores, ~3 min on busy ones, after a ~20 s set-up), then is scored next to the untrained model
# on held-out receipts (~1 minute).
demo: install
	@run_dir=outputs/demo/$$(date +%Y-%m-%d_%H-%M-%S); \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) launch.py experiment=receipts_demo hydra.run.dir=$$run_dir && \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m vlm_sweep.cli.evaluate --checkpoint $$run_dir --compare-base --examples 3 \
		experiment=receipts_demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not slurm"

# The training loop side by side with a bare loop, transformers.Trainer and TRL (interleaved rounds),
# and the memory the loss and activation checkpointing save: scripts/benchmark.py, docs/performance.md.
# ~10 minutes on 2 cores; `make bench ARGS=--quick` is a 2-round smoke run.
bench: install
	@$(PY) -c "import trl" 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) outputs/* .pytest_cache
