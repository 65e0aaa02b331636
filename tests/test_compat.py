"""Run directories written before model families and pluggable feature networks (`vgg_*` keys in config.yaml and
the trainer state, the resolved precision in the config) keep loading and resuming. The fixture
tests/fixtures/legacy-run is such a run (DFC-VAE, random VGG19, 32x32, base 4 channels, latent 8, 2 of 4 steps on
the session's synthetic shards), made with commit 5a67d32; an uninterrupted 4-step run of that code ended with the
parameters' digest below, on 2 torch threads (another thread count sums in another order: other bits)."""

import json
import shutil
import sys

import pytest
import torch

from dfcvae_dist.config import load_config
from dfcvae_dist.inference import decode, load_trained, load_weights_file
from dfcvae_dist.training.state import TrainerState
from tests.helpers import ROOT

LEGACY = ROOT / "tests" / "fixtures" / "legacy-run"
DIGEST_AT_STEP_4 = "6b0e5e12cbc70764e92eb5ea32ac4bce81492831e7899a16b9d41f99bc2fa063"


def test_a_legacy_run_directory_loads_with_its_vgg_fields_mapped():
    checkpoint = LEGACY / "checkpoints" / "step-00000002"
    cfg = load_config(checkpoint / "config.yaml")
    assert (cfg.loss.network, cfg.loss.network_weights, cfg.loss.layers) == \
        ("vgg19", "random", ["relu1_2", "relu2_1", "relu3_1"])
    assert TrainerState.read(checkpoint).feature_weights == "random(seed=0)"
    model, _, found = load_trained(LEGACY)
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    assert found == checkpoint and torch.equal(decode(model, z), decode(load_weights_file(checkpoint /
                                                                                         "weights.safetensors"), z))


@pytest.mark.slow
def test_a_legacy_run_resumes_to_the_same_weights_as_the_old_code_trained(tmp_path, shard_dir, processes):
    """Also proves the feature network computes what the old VGG19 module did, bit for bit."""
    shutil.copytree(LEGACY, tmp_path / "legacy-run")
    (tmp_path / "shards").symlink_to(shard_dir)
    proc = processes.run([sys.executable, "-m", "dfcvae_dist.train", "--config", "legacy-run/config.yaml",
                          "train.max_steps=4", "train.threads=2"], 600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from legacy-run/checkpoints/step-00000002 at step 2" in proc.stderr
    rank = json.loads((tmp_path / "legacy-run" / "ranks" / "rank-0.json").read_text())
    assert rank["params_sha256"] == DIGEST_AT_STEP_4
