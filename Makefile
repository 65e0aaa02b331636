# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.PHONY: venv test slurm-tools quickstart clean-quickstart

venv: $(STAMP)

# Reinstalls only when the lock file or pyproject.toml changed (or .venv is missing/broken).
$(STAMP): requirements.lock pyproject.toml
	@$(BIN)/python -c "import sys; assert sys.version_info[:2] == (3, 11)" 2>/dev/null || \
		{ rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.lock
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP) slurm-tools
	$(BIN)/python -m pytest tests

# The Slurm tests start a private two-node cluster from Debian's slurm-wlm and munge; installed here when
# running as root and missing (otherwise those tests are skipped with the reason).
slurm-tools:
	@if [ "$$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
		|| echo "could not install slurm-wlm and munge: the Slurm tests will be skipped"; fi

QS := quickstart
LAUNCH_CPU2 := $(BIN)/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
QS_MLFLOW := MLFLOW_TRACKING_URI=sqlite:///$(QS)/mlflow.db
# synthetic CelebA -> landmark-crop shards -> DFC-VAE and PVAE (2 processes each) -> latents (2 processes)
# -> SVM table -> latent-space figures -> quality table. Offline; about 10 minutes on 2 cores.
quickstart: $(STAMP)
	$(BIN)/python tools/make_synthetic_celeba.py --out $(QS)/celeba --num 16000 --seed 0
	$(BIN)/python tools/make_shards.py --celeba-root $(QS)/celeba --out $(QS)/shards/landmarks-32 --image-size 32 --crop landmarks --shard-size 500
	$(QS_MLFLOW) $(LAUNCH_CPU2) -m dfcvae_dist.train --config configs/quickstart.yaml
	$(QS_MLFLOW) $(LAUNCH_CPU2) -m dfcvae_dist.train --config configs/quickstart.yaml model.name=pvae loss.beta=1.0 \
		train.run_dir=$(QS)/runs/pvae log.image_every_steps=0
	$(QS_MLFLOW) $(LAUNCH_CPU2) tools/extract_latents.py --checkpoint $(QS)/runs/dfcvae \
		--shards $(QS)/shards/landmarks-32 --out $(QS)/results/latents
	$(QS_MLFLOW) $(BIN)/python tools/eval_svm.py --latents $(QS)/results/latents/latents.npz --out $(QS)/results/svm \
		--class-weight balanced --focus synthetic --mlflow-run $(QS)/runs/dfcvae
	$(QS_MLFLOW) $(BIN)/python tools/explore_latents.py --checkpoint $(QS)/runs/dfcvae --latents $(QS)/results/latents/latents.npz \
		--shards $(QS)/shards/landmarks-32 --split train --out $(QS)/results/studies --attributes Smiling,Eyeglasses,Male \
		--mlflow-run $(QS)/runs/dfcvae
	$(BIN)/python tools/quality.py --checkpoint dfcvae=$(QS)/runs/dfcvae --checkpoint pvae=$(QS)/runs/pvae \
		--shards $(QS)/shards/landmarks-32 --vgg-weights random --fid --out $(QS)/results/quality
	@echo
	@echo "Results (random VGG19 weights: a demo of the pipeline, not the paper's numbers):"
	@echo "  checkpoints   $(QS)/runs/dfcvae, $(QS)/runs/pvae"
	@echo "  SVM table     $(QS)/results/svm/svm_table.md"
	@echo "  figures       $(QS)/results/studies/*.png"
	@echo "  quality       $(QS)/results/quality/quality.json"
	@echo "  MLflow        $(BIN)/mlflow ui --backend-store-uri sqlite:///$(QS)/mlflow.db   (artifacts: $(QS)/mlartifacts)"
	@echo "                then open the model-training view: http://127.0.0.1:5000/#/experiments/$$($(BIN)/python -c \
		"import mlflow; print(mlflow.MlflowClient('sqlite:///$(QS)/mlflow.db').get_experiment_by_name('quickstart').experiment_id)" \
		2>/dev/null)?workflowType=machine_learning"

clean-quickstart:
	rm -rf $(QS)
	@if [ -d mlruns ]; then echo "note: ./mlruns holds artifacts of runs logged before they moved beside the store; remove it by hand if nothing else logged there"; fi
