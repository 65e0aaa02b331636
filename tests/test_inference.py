"""Using a trained model without the training stack."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dfcvae_dist.data.shards import manifest_digest, read_manifest
from dfcvae_dist.errors import UserError
from dfcvae_dist.export import export_model
from dfcvae_dist.inference import (GaussianMixtureSampler, attribute_vector, decode, interpolate, load_trained,
                                   load_weights_file, resolve_checkpoint)
from dfcvae_dist.training.checkpoint import weights_bytes
from tests.helpers import run_tool


def test_inference_imports_neither_accelerate_deepspeed_nor_mlflow():
    code = "import sys, dfcvae_dist.inference; print(sorted({'accelerate', 'deepspeed', 'mlflow'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_weights_file_alone_rebuilds_the_model(trained_run, tmp_path):
    model, _, checkpoint = load_trained(trained_run)
    alone = load_weights_file(checkpoint / "weights.safetensors")
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decode(model, z), decode(alone, z))
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(plain))  # no metadata: a file from before it was kept
    with pytest.raises(UserError, match="no model config in its metadata"):
        load_weights_file(plain)


@pytest.mark.parametrize("change, message", [
    ({"latent_dim": 10_000_000}, "metadata: 'model.latent_dim' must be between 1 and 4096, got 10000000"),  # 160 GB
    ({"latent_dim": "many"}, "metadata: 'model.latent_dim' must be of type int, got 'many'"),
    ({"laten_dim": 16}, "metadata: unknown key 'model.laten_dim' (did you mean 'model.latent_dim'?)"),  # TypeError
    ({"name": "gan"}, "metadata: 'model.name' must be one of"),
    ({"latent_dim": 16}, "does not load into dfcvae (Error(s) in loading state_dict for VAE: size mismatch for "
                         "encoder.fc_mu.weight: [100, 2048] in the checkpoint, [16, 2048] in the model; "),
], ids=["huge-latent", "latent-not-int", "unknown-key", "unknown-family", "weights-of-another-latent-size"])
def test_a_weights_file_whose_model_config_is_bad_is_refused_before_a_model_is_built(trained_run, tmp_path, change,
                                                                                       message):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    original = trained_run / "checkpoints" / (trained_run / "checkpoints" / "latest").read_text().strip()
    with safe_open(str(original / "weights.safetensors"), "pt") as f:
        metadata = f.metadata()
    bad = tmp_path / "weights.safetensors"
    save_file(load_file(str(original / "weights.safetensors")), str(bad),
              metadata={**metadata, "model": json.dumps({**json.loads(metadata["model"]), **change})})
    with pytest.raises(UserError) as refused:
        load_weights_file(bad)
    assert str(refused.value).startswith(f"{bad}: {message}"), str(refused.value)


def test_a_model_uri_mlflow_cannot_fetch_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(UserError, match=r"^models:/m-0123: MLflow could not fetch the model \(.*not found"):
        load_trained("models:/m-0123")
    with pytest.raises(UserError, match=r"^runs:/0123/model: MLflow could not fetch the model"):
        load_trained("runs:/0123/model")


class HalvingAutoencoder(nn.Module):
    """z = 2x, x = z / 2 (images of 1 x 1 x 2 pixels): every interpolated image is known by hand."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def encode(self, x):
        return x.flatten(1) * self.scale, x.new_zeros(len(x), 0)

    def decode(self, z):
        return (z / self.scale).view(-1, 1, 1, 2)


def test_interpolate_decodes_evenly_spaced_points_between_the_two_latent_means():
    model = HalvingAutoencoder()
    a, b = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, -1.0]]])
    hand = torch.tensor([[0.0, 1.0], [0.25, 0.5], [0.5, 0.0], [0.75, -0.5], [1.0, -1.0]]).view(5, 1, 1, 2)
    torch.testing.assert_close(interpolate(model, a, b, steps=5), hand)
    pairs = interpolate(model, torch.stack([a, b]), torch.stack([b, a]), steps=3)  # N pairs: (N, steps, ...)
    assert pairs.shape == (2, 3, 1, 1, 2) and torch.equal(pairs[1, 0], b) and torch.equal(pairs[1, 2], a)
    torch.testing.assert_close(pairs[1, 1], torch.tensor([[[0.5, 0.0]]]))
    with pytest.raises(UserError, match="interpolation steps: 1; at least 2"):
        interpolate(model, a, b, steps=1)


def test_attribute_vector_is_the_mean_latent_with_the_attribute_minus_without():
    latents = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [2.0, 2.0]])
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [1, 1]])
    # Smiling: rows 0, 1, 4 have it, mean (2, 2/3); rows 2, 3 do not, mean (0, 3)
    smiling = attribute_vector(latents, labels, "Smiling", ["Smiling", "Male"])
    torch.testing.assert_close(smiling, torch.tensor([2.0, 2 / 3 - 3], dtype=torch.float64))
    # Male by its column: rows 1, 2, 4, mean (5/3, 4/3), minus rows 0, 3, mean (1/2, 2)
    male = attribute_vector(torch.from_numpy(latents).float(), torch.from_numpy(labels), 1)
    torch.testing.assert_close(male, torch.tensor([5 / 3 - 1 / 2, 4 / 3 - 2], dtype=torch.float64))
    with pytest.raises(UserError, match="^unknown attribute Bald; known: Smiling, Male$"):
        attribute_vector(latents, labels, "Bald", ["Smiling", "Male"])
    with pytest.raises(UserError, match="all 3 images have it; a vector needs images with and without it"):
        attribute_vector(latents[:2].tolist() + [[0, 0]], [[1, 0], [1, 0], [1, 0]], 0)


def mixture_moments(mixture: GaussianMixtureSampler) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the fitted mixture: sum_k w_k mu_k, and sum_k w_k (S_k + mu_k mu_k^T) - mean mean^T."""
    mean = mixture.weights @ mixture.means
    second = sum(w * (s + np.outer(m, m))
                 for w, m, s in zip(mixture.weights, mixture.means, mixture.covariances, strict=True))
    return mean, second - np.outer(mean, mean)


def test_gaussian_mixture_samples_have_the_fitted_mixtures_moments(tmp_path):
    rng = np.random.default_rng(0)
    latents = np.concatenate([rng.normal([-4.0, 0.0, 1.0], [0.5, 1.0, 0.2], (600, 3)),
                              rng.normal([4.0, 2.0, -1.0], 1.0, (400, 3))])
    mixture = GaussianMixtureSampler.fit(latents, n_components=2)
    left, right = np.argsort(mixture.means[:, 0])  # the fit found the two clusters
    np.testing.assert_allclose(mixture.weights[[left, right]], [0.6, 0.4], atol=0.01)
    np.testing.assert_allclose(mixture.means[[left, right]], [[-4, 0, 1], [4, 2, -1]], atol=0.15)
    z = mixture.sample(200_000, seed=1).double().numpy()
    mean, covariance = mixture_moments(mixture)
    np.testing.assert_allclose(z.mean(0), mean, atol=0.03)  # standard errors <= 0.009
    np.testing.assert_allclose(np.cov(z.T), covariance, atol=0.15, rtol=0.02)
    from_right = z[:, 0] > 0  # the clusters are 8 standard deviations apart
    assert abs(from_right.mean() - mixture.weights[right]) < 0.005
    for k, chosen in ((left, ~from_right), (right, from_right)):
        np.testing.assert_allclose(z[chosen].mean(0), mixture.means[k], atol=0.02)
        np.testing.assert_allclose(np.cov(z[chosen].T), mixture.covariances[k], atol=0.03)
    assert 0 < from_right[:20].sum() < 20  # components in random order, not grouped as scikit-learn's sample()
    assert torch.equal(mixture.sample(8, seed=1), mixture.sample(8, seed=1))
    assert not torch.equal(mixture.sample(8, seed=1), mixture.sample(8, seed=2))
    mixture.save(tmp_path / "gmm.safetensors")
    assert torch.equal(GaussianMixtureSampler.load(tmp_path / "gmm.safetensors").sample(8, seed=1),
                       mixture.sample(8, seed=1))


def test_a_hub_model_that_cannot_be_downloaded_is_one_line_naming_the_hub(unreachable_hub):
    endpoint = os.environ["HF_ENDPOINT"]
    with pytest.raises(UserError, match=rf"^hf://owner/name: could not download from the Hugging Face Hub at "
                                        rf"{re.escape(endpoint)} \(.*Connection refused[^\n]*$"):
        load_trained("hf://owner/name")
    with pytest.raises(UserError, match="^hf://owner: expected hf://OWNER/NAME or hf://OWNER/NAME@REVISION$"):
        load_trained("hf://owner")


def test_exported_folder_decodes_as_its_run_and_a_push_without_network_fails_in_one_line(
        trained_run, shard_dir, tmp_path, unreachable_hub):
    run = shutil.copytree(trained_run, tmp_path / "run")
    checkpoint = resolve_checkpoint(run)
    for report, content in (("quality/quality.json", {"models": {"run": {"checkpoint": str(checkpoint), "mse": 0.0123,
                                                                         "fid": None}},
                                                      "notes": {"fid": "n/a: no FID weights here"}}),
                            ("svm/svm_report.json", {"checkpoint": "/elsewhere/step-00000003", "mean_accuracy": 0.9})):
        (run / "eval" / report).parent.mkdir(parents=True)
        (run / "eval" / report).write_text(json.dumps(content))
    out = tmp_path / "model"
    proc = run_tool("export.py", run, "--out", out, "--push", "owner/name", check=False)
    assert proc.returncode == 2 and proc.stdout.startswith(f"wrote {out} ")
    assert proc.stderr.strip().splitlines() == [
        f"error: --push owner/name: could not upload to the Hugging Face Hub at {os.environ['HF_ENDPOINT']} "
        f"(ConnectError: [Errno 111] Connection refused); {out} is complete: push it again later"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    (run_model, run_cfg, _), (model, cfg, folder) = load_trained(run), load_trained(out)
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decode(model, z), decode(run_model, z)) and cfg == run_cfg and folder == out
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "dfcvae" and config["model"] == {"name": "dfcvae", "image_size": 32, "latent_dim": 100,
                                                                 "base_channels": 32, "init": "normal"}
    card = (out / "README.md").read_text()
    assert "library_name: dfcvae_dist" in card and "RANDOM vgg19 loss-network weights (`random(seed=0)`)" in card
    assert "**Warning: trained on synthetic faces**" in card
    assert f"manifest digest `{manifest_digest(read_manifest(shard_dir))}`" in card and "321 train /" in card
    assert "| `eval/quality/mse` (MSE) | 0.0123 |" in card and "| `eval/quality/fid` (FID) | n/a |" in card
    assert "- `fid`: n/a: no FID weights here" in card and "eval/svm/mean_accuracy" not in card
    assert "`eval/svm/svm_report.json` evaluated `/elsewhere/step-00000003`, not this one: left out" in card


def test_which_best_exports_the_checkpoint_best_names(trained_run, tmp_path):
    """A run whose checkpoints/best names an earlier step than latest (weights written by the trainer's writer)."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    latest_model, cfg, latest = load_trained(run)
    best = shutil.copytree(latest, latest.parent / "step-00000003")
    halved = {name: tensor / 2 for name, tensor in load_file(latest / "weights.safetensors").items()}
    (best / "weights.safetensors").write_bytes(weights_bytes(halved, dataclasses.asdict(cfg.model)))
    (run / "checkpoints" / "best").write_text("step-00000003\n")
    assert export_model(run, tmp_path / "best", which="best") == best
    assert export_model(run, tmp_path / "latest") == latest
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    (best_model, _, _), (exported_latest, _, _) = load_trained(run, which="best"), load_trained(tmp_path / "latest")
    assert torch.equal(decode(load_trained(tmp_path / "best")[0], z), decode(best_model, z))
    assert torch.equal(decode(exported_latest, z), decode(latest_model, z))
    assert not torch.equal(decode(best_model, z), decode(latest_model, z))
    assert "Checkpoint `step-00000003` (best)" in (tmp_path / "best" / "README.md").read_text()
