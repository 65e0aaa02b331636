"""The MLflow "models from code" file of a trained VAE: `mlflow.pyfunc.load_model` runs this file, and the
model it sets reads the logged `weights.safetensors` and `config.yaml` with our own loader, so loading
unpickles nothing (docs/reliability.md, "Logged models"). Logged by `dfcvae_dist.model_logging`.

`predict(inputs, params={"mode": ...})`, inputs a float32 ndarray (MLflow's pyfunc takes no torch tensors;
our inference API does):
- `reconstruct` (default): images (N, 3, S, S) in [0, 1] -> the decoded posterior means, (N, 3, S, S)
- `encode`: images -> (N, 2, latent_dim), mu and logvar
- `decode`: latents (N, latent_dim) or (N, latent_dim, 1, 1) -> images (N, 3, S, S)
A family without an encoder (DCGAN) decodes only. The signature declares `mode` alone: MLflow would check the
input against one shape, so this model checks it, naming the shapes it takes.
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

    def predict(self, context, model_input: np.ndarray, params=None):
        from dfcvae_dist.families import get_family
        from dfcvae_dist.inference import decode, encode

        mode = (params or {}).get("mode", "reconstruct")
        decodes_only = not get_family(self.config.model.name).encodes
        if mode not in MODES or (decodes_only and mode != "decode"):
            raise ValueError(f"mode {mode!r}: choose one of {'decode' if decodes_only else ', '.join(MODES)}")
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if mode == "decode":
            return decode(self.model, self.latents(x)).cpu().numpy()
        mu, logvar = encode(self.model, self.images(x))
        if mode == "encode":
            return torch.stack([mu, logvar], dim=1).cpu().numpy()
        return decode(self.model, mu).cpu().numpy()

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        d = self.config.model.latent_dim
        if x.ndim == 2 and x.shape[1] == d or x.ndim == 4 and tuple(x.shape[1:]) == (d, 1, 1):
            return x.reshape(len(x), d)
        raise ValueError(f"decode takes latents of shape (N, {d}) or (N, {d}, 1, 1), not {tuple(x.shape)}")

    def images(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.model.image_size
        if x.ndim == 4 and tuple(x.shape[1:]) == (3, size, size):
            return x
        raise ValueError(f"reconstruct and encode take images of shape (N, 3, {size}, {size}), not {tuple(x.shape)}")


set_model(TrainedVAE())
