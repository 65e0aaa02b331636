# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.PHONY: venv test quickstart clean-quickstart

venv: $(STAMP)

# Reinstalls only when the lock file or pyproject.toml changed (or .venv is missing/broken).
$(STAMP): requirements.lock pyproject.toml
	@$(BIN)/python -c "import sys; assert sys.version_info[:2] == (3, 11)" 2>/dev/null || \
		{ rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.lock
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

QS := quickstart
LAUNCH_CPU2 := $(BIN)/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
quickstart: $(STAMP)
	$(BIN)/python tools/make_synthetic_celeba.py --out $(QS)/celeba --num 4000 --seed 0
	$(BIN)/python tools/make_shards.py --celeba-root $(QS)/celeba --out $(QS)/shards/paper-32 --image-size 32 --shard-size 250
	$(BIN)/python tools/make_shards.py --celeba-root $(QS)/celeba --out $(QS)/shards/landmarks-32 --image-size 32 --crop landmarks --shard-size 250
	MLFLOW_TRACKING_URI=sqlite:///$(QS)/mlflow.db $(LAUNCH_CPU2) -m dfcvae_dist.train --config configs/quickstart.yaml
	@echo "results: $(QS)/runs/dfcvae (checkpoints), MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(QS)/mlflow.db"

clean-quickstart:
	rm -rf $(QS)
