# The README's commands. Each target creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STUDY  ?= components
WORKERS ?= auto
STAMP  := $(VENV)/.installed

.PHONY: venv study run figures test ui dry-run status bench gpu-check torture fake-cifar100 clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

# Train every pending cell, then draw the figures even if some cells failed,
# and exit with the run's status.
study: $(STAMP)
	@$(BIN)/kdablate run $(STUDY) --workers $(WORKERS); rc=$$?; \
	  [ $$rc -eq 2 ] && exit 2; \
	  $(MAKE) --no-print-directory figures STUDY=$(STUDY) || exit $$?; exit $$rc

# Tables, figures and report.md of a study, from MLflow, into figures/$(STUDY)/.
figures: $(STAMP)
	$(BIN)/kdablate report $(STUDY)

dry-run: $(STAMP)
	$(BIN)/kdablate dry-run $(STUDY)

status: $(STAMP)
	$(BIN)/kdablate status $(STUDY)

# The import layers first (pyproject.toml, [tool.importlinter]): seconds, and a broken layer fails fast.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns.db} --port $${PORT:-5000}

# The benchmark suite (README, "Performance"): every row measured side by side, table printed and
# written to figures/bench/bench.json. BENCH_ARGS="--compile" adds torch.compile (minutes).
bench: $(STAMP)
	$(BIN)/python -m kdablate.bench $(BENCH_ARGS)

# The CUDA path against the CPU (README, "GPU"): a short image study per device and precision.
gpu-check: $(STAMP)
	$(BIN)/python -m kdablate.bench.gpu $(GPU_ARGS)

# Kill -9 torture (README, "Trust"): TRIALS random kills of the smoke study, some while the store is
# being created, each followed by a rerun; every trial must end with one FINISHED run per cell.
TRIALS ?= 20
torture: $(STAMP)
	$(BIN)/python -m tests.torture --trials $(TRIALS)

# Synthetic CIFAR-100 in its real on-disk format under data/, to try the *_cifar100_quick studies
# where the real data cannot be had. Not CIFAR: its numbers say nothing about CIFAR.
fake-cifar100: $(STAMP)
	$(BIN)/python -m kdablate.data.fake cifar100 data --train 10000 --test 2000

clean:
	rm -rf $(VENV) .cache figures mlruns.db mlartifacts
