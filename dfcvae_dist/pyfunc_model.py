"""The MLflow "models from code" file of a trained VAE: `mlflow.pyfunc.load_model` runs this file, and the
model it sets reads the logged `weights.safetensors` and `config.yaml` with our own loader, so loading
unpickles nothing (docs/reliability.md, "Logged models"). Logged by `dfcvae_dist.model_logging`.

`predict(inputs, params={"mode": ...})`, inputs a float32 ndarray (MLflow's signature check refuses torch
tensors; our inference API takes them):
- `reconstruct` (default): images (N, 3, S, S) in [0, 1] -> the decoded posterior means, (N, 3, S, S)
- `encode`: images -> (N, 2, latent_dim), mu and logvar
- `decode`: latents (N, latent_dim, 1, 1) (the signature has one 4-D input) or (N, latent_dim) -> images
A DCGAN generator decodes only.
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
        from dfcvae_dist.inference import decode, encode
        from dfcvae_dist.models import DCGAN

        mode = (params or {}).get("mode", "reconstruct")
        gan = isinstance(self.model, DCGAN)
        if mode not in MODES or (gan and mode != "decode"):
            raise ValueError(f"mode {mode!r}: choose one of {'decode' if gan else ', '.join(MODES)}")
        x = torch.as_tensor(model_input).float()
        if mode == "decode":
            z = x.reshape(len(x), -1)
            if gan:
                with torch.no_grad():
                    return self.model.generator(z).cpu().numpy()
            return decode(self.model, z).cpu().numpy()
        mu, logvar = encode(self.model, x)
        if mode == "encode":
            return torch.stack([mu, logvar], dim=1).cpu().numpy()
        return decode(self.model, mu).cpu().numpy()


set_model(TrainedVAE())
