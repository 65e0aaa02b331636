"""Using a trained model without the training stack."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dfcvae_dist.errors import UserError
from dfcvae_dist.inference import decode, load_trained, load_weights_file


def test_inference_imports_neither_accelerate_deepspeed_nor_mlflow():
    code = "import sys, dfcvae_dist.inference; print(sorted({'accelerate', 'deepspeed', 'mlflow'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


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
    ({"latent_dim": 10_000_000}, "metadata: 'model.latent_dim' must be between 1 and 4096, got 10000000"),  # 160 GB to build
    ({"latent_dim": "many"}, "metadata: 'model.latent_dim' must be of type int, got 'many'"),
    ({"laten_dim": 16}, "metadata: unknown key 'model.laten_dim' (did you mean 'model.latent_dim'?)"),  # was a TypeError
    ({"name": "gan"}, "metadata: 'model.name' must be one of"),
    ({"latent_dim": 16}, "does not load into dfcvae (Error(s) in loading state_dict for VAE: size mismatch for "
                         "encoder.fc_mu.weight: [100, 2048] in the checkpoint, [16, 2048] in the model; "),  # was cut at ':'
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


def test_the_pyfunc_model_names_the_shape_it_expects(trained_run):
    """Latents or images of another size failed in a matrix multiply, naming neither."""
    from dfcvae_dist.pyfunc_model import TrainedVAE

    pyfunc = TrainedVAE()
    checkpoint = load_trained(trained_run)[2]
    pyfunc.load_context(SimpleNamespace(artifacts={"weights": str(checkpoint / "weights.safetensors")}))
    assert pyfunc.predict(None, np.zeros((2, 100, 1, 1), np.float32), {"mode": "decode"}).shape == (2, 3, 32, 32)
    cases = [("decode", (2, 16, 1, 1), "decode: latents of shape (N, 100, 1, 1) or (N, 100), got (2, 16, 1, 1)"),
             ("decode", (2, 16), "decode: latents of shape (N, 100, 1, 1) or (N, 100), got (2, 16)"),
             ("encode", (2, 3, 64, 64), "encode: images of shape (N, 3, 32, 32) in [0, 1], got (2, 3, 64, 64)"),
             ("reconstruct", (2, 32, 32), "reconstruct: images of shape (N, 3, 32, 32) in [0, 1], got (2, 32, 32)")]
    for mode, shape, message in cases:
        with pytest.raises(ValueError) as refused:
            pyfunc.predict(None, np.zeros(shape, np.float32), {"mode": mode})
        assert str(refused.value) == message
