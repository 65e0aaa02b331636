# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.PHONY: venv test test-fast slurm-tools browser-tools quickstart clean-quickstart reproduce reproduce-celeba reproduce-cpu

venv: $(STAMP)

# Reinstalls only when the lock file or pyproject.toml changed (or .venv is missing/broken).
$(STAMP): requirements.lock pyproject.toml
	@$(BIN)/python -c "import sys; assert sys.version_info[:2] == (3, 11)" 2>/dev/null || \
		{ rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.lock
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP) slurm-tools browser-tools
	$(BIN)/ruff check dfcvae_dist tools tests
	$(BIN)/python -m pytest tests -n 2 --durations=25

# The edit loop: lint, then every test not marked slow (pyproject.toml says what slow is).
test-fast: $(STAMP)
	$(BIN)/ruff check dfcvae_dist tools tests
	$(BIN)/python -m pytest tests -m "not slow" -n 2 --durations=10

# The Slurm tests start a private two-node cluster from Debian's slurm-wlm and munge; installed here when
# running as root and missing (otherwise those tests are skipped with the reason).
slurm-tools:
	@if [ "$$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
		|| echo "could not install slurm-wlm and munge: the Slurm tests will be skipped"; fi

# The real-browser test loads a run's MLflow page in Debian's headless chromium; installed here when running
# as root and missing (otherwise that test is skipped with the reason).
browser-tools:
	@if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: the real-browser test will be skipped"; fi

QS := quickstart
# every option given: without a config file, accelerate warns about each one it defaults
LAUNCH_CPU2 := $(BIN)/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
	--dynamo_backend no
QS_MLFLOW := MLFLOW_TRACKING_URI=sqlite:///$(QS)/mlflow.db
# synthetic CelebA -> landmark-crop shards -> DFC-VAE and PVAE (2 processes each) -> latents (2 processes)
# -> per model: latents, SVM table, quality table (into RUN_DIR/eval/ and the model's MLflow run) -> latent-space
# figures -> the two models' report, ending with their headline numbers and MLflow run pages. Offline; 20-50
# minutes on 2 cores (21 measured beside other work, 46 under a heavy load).
quickstart: $(STAMP)
	$(BIN)/python tools/make_synthetic_celeba.py --out $(QS)/celeba --num 16000 --seed 0
	$(BIN)/python tools/make_shards.py --celeba-root $(QS)/celeba --out $(QS)/shards/landmarks-32 --image-size 32 --crop landmarks --shard-size 500
	$(QS_MLFLOW) $(LAUNCH_CPU2) -m dfcvae_dist.train --config configs/quickstart.yaml
	$(QS_MLFLOW) $(LAUNCH_CPU2) -m dfcvae_dist.train --config configs/quickstart.yaml model.name=pvae loss.beta=1.0 \
		train.run_dir=$(QS)/runs/pvae log.image_every_steps=0
	for m in dfcvae pvae; do \
		$(QS_MLFLOW) $(LAUNCH_CPU2) tools/extract_latents.py --checkpoint $(QS)/runs/$$m \
			--shards $(QS)/shards/landmarks-32 --out $(QS)/runs/$$m/eval/latents && \
		$(QS_MLFLOW) $(BIN)/python tools/eval_svm.py --latents $(QS)/runs/$$m/eval/latents/latents.npz \
			--out $(QS)/runs/$$m/eval/svm --class-weight balanced --focus synthetic --mlflow-run $(QS)/runs/$$m && \
		$(QS_MLFLOW) $(BIN)/python tools/quality.py --checkpoint $$m=$(QS)/runs/$$m --shards $(QS)/shards/landmarks-32 \
			--network-weights random --out $(QS)/runs/$$m/eval/quality || exit 1; done
	$(QS_MLFLOW) $(BIN)/python tools/explore_latents.py --checkpoint $(QS)/runs/dfcvae --latents $(QS)/runs/dfcvae/eval/latents/latents.npz \
		--shards $(QS)/shards/landmarks-32 --split train --out $(QS)/results/studies --attributes Smiling,Eyeglasses,Male \
		--mlflow-run $(QS)/runs/dfcvae
	@echo
	@echo "Results (synthetic faces, random VGG19 weights: a demo of the pipeline, not the paper's numbers):"
	@echo "  checkpoints   $(QS)/runs/dfcvae, $(QS)/runs/pvae"
	@echo "  SVM tables    $(QS)/runs/{dfcvae,pvae}/eval/svm/svm_table.md  (KL per image, active units: svm_report.json)"
	@echo "  quality       $(QS)/runs/{dfcvae,pvae}/eval/quality/quality.json  (samples per sampler: samples-{normal,gmm}-*.png)"
	@echo "  figures       $(QS)/results/studies/*.png"
	@echo "  report        $(QS)/results/report/report.md  (both models side by side; samples.png, reconstructions.png)"
	@$(QS_MLFLOW) $(BIN)/python tools/report.py --runs dfcvae=$(QS)/runs/dfcvae --runs pvae=$(QS)/runs/pvae \
		--out $(QS)/results/report

clean-quickstart:
	rm -rf $(QS)
	@if [ -d mlruns ]; then echo "note: ./mlruns holds artifacts of runs logged before they moved beside the store; remove it by hand if nothing else logged there"; fi

RP := reproduce
RP_MLFLOW := MLFLOW_TRACKING_URI=sqlite:///$(RP)/mlflow.db
# The paper's comparison (DFC-VAE 123 and 345, PVAE, DCGAN) as one sweep, then its report (docs/sweeps.md#report).
# With CELEBA_ROOT set and a GPU: sweeps/paper.yaml on real CelebA, 3 seeds. Otherwise sweeps/paper-cpu.yaml:
# synthetic 32x32 faces, 1 seed, 40-50 minutes on 2 cores. Not part of `make test`; re-run, it skips what is done.
reproduce: $(STAMP)
	@mkdir -p $(RP) && date +%s > $(RP)/.started
	@if [ -n "$$CELEBA_ROOT" ] && $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; \
		then $(MAKE) --no-print-directory reproduce-celeba; else $(MAKE) --no-print-directory reproduce-cpu; fi
	@echo "  wall time     $$(( $$(date +%s) - $$(cat $(RP)/.started) )) s"
	@echo "  MLflow        $(BIN)/mlflow ui --backend-store-uri sqlite:///$(RP)/mlflow.db   (then http://127.0.0.1:5000)"

reproduce-celeba: $(STAMP)
	$(BIN)/python tools/make_shards.py --celeba-root $(CELEBA_ROOT) --out data/shards/paper-64
	$(BIN)/python tools/make_shards.py --celeba-root $(CELEBA_ROOT) --out data/shards/landmarks-64 --crop landmarks
	$(RP_MLFLOW) $(BIN)/python tools/sweep.py run sweeps/paper.yaml --parallel 1
	$(RP_MLFLOW) $(BIN)/python tools/report.py --sweep sweeps/paper.yaml --out $(RP)/report-paper
	@echo
	@echo "Report (real CelebA, 3 seeds): $(RP)/report-paper/report.md (figures beside it; also in the sweep's MLflow parent run)"

reproduce-cpu: $(STAMP)
	@test -f $(RP)/celeba/identity_CelebA.txt || \
		$(BIN)/python tools/make_synthetic_celeba.py --out $(RP)/celeba --num 16000 --seed 0
	$(BIN)/python tools/make_shards.py --celeba-root $(RP)/celeba --out $(RP)/shards/landmarks-32 --image-size 32 \
		--crop landmarks --shard-size 500
	$(RP_MLFLOW) $(BIN)/python tools/sweep.py run sweeps/paper-cpu.yaml --parallel 1
	$(RP_MLFLOW) $(BIN)/python tools/report.py --sweep sweeps/paper-cpu.yaml --out $(RP)/report
	@echo
	@echo "Report (synthetic faces, random VGG19 weights: a demo of the pipeline, not the paper's numbers):"
	@echo "  report        $(RP)/report/report.md   (report.json, samples.png, reconstructions.png beside it)"
