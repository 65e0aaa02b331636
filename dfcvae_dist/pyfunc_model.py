"""The MLflow "models from code" file of a trained VAE: `mlflow.pyfunc.load_model` runs this file, and the
model it sets reads the logged `weights.safetensors` and `config.yaml` with our own loader, so loading
unpickles nothing (docs/reliability.md, "Logged models"). Logged by `dfcvae_dist.model_logging`.

`predict(inputs, params={"mode": ...})`, inputs a float32 ndarray (MLflow's signature check refuses torch
tensors; our inference API takes them):
- `reconstruct` (default): images (N, 3, S, S) in [0, 1] -> the decoded posterior means, (N, 3, S, S)
- `encode`: images -> (N, 2, latent_dim), mu and logvar
- `decode`: latents (N, latent_dim, 1, 1) (the signature has one 4-D input) or (N, latent_dim) -> images
A family without an encoder (DCGAN) decodes only.
"""

from pathlib import Path

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

MODES = ("reconstruct", "encode", "decode")


class TrainedVAE(PythonModel):
    def load_context(self, context):
        from dfcvae_dist.inference import load_trained

        # the artifacts folder holds weights.safetensors and config.yaml: a checkpoint folder to load_trained
        self.model, self.config, _ = load_trained(Path(context.artifacts["weights"]).parent, expect=None)

    def predict(self, context, model_input: np.ndarray, params=None):  # MLflow's tensor signature checks it
        from dfcvae_dist.families import get_family
        from dfcvae_dist.inference import decode, encode

        mode = (params or {}).get("mode", "reconstruct")
        decodes_only = not get_family(self.config.model.name).encodes
        if mode not in MODES or (decodes_only and mode != "decode"):
            raise ValueError(f"mode {mode!r}: choose one of {'decode' if decodes_only else ', '.join(MODES)}")
        x = torch.as_tensor(model_input).float()
        if mode == "decode":
            return decode(self.model, self.latents(x)).cpu().numpy()
        mu, logvar = encode(self.model, self.images(x, mode))
        if mode == "encode":
            return torch.stack([mu, logvar], dim=1).cpu().numpy()
        return decode(self.model, mu).cpu().numpy()


    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """(N, latent_dim, 1, 1) or (N, latent_dim) -> (N, latent_dim); another shape is named, not left to fail in
        a matrix multiply."""
        size = self.config.model.latent_dim
        if tuple(x.shape[1:]) not in ((size,), (size, 1, 1)):
            raise ValueError(f"decode: latents of shape (N, {size}, 1, 1) or (N, {size}), got {tuple(x.shape)}")
        return x.reshape(len(x), size)

    def images(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        size = self.config.model.image_size
        if tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(f"{mode}: images of shape (N, 3, {size}, {size}) in [0, 1], got {tuple(x.shape)}")
        return x


set_model(TrainedVAE())
