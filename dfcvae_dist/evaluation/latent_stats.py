"""How much of the latent space a VAE uses, from the posteriors of a split's images (latents.npz):

- KL per image: the mean over images of KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dimensions
  (the rate term of the ELBO, in nats);
- active units (Burda et al. 2016, "Importance Weighted Autoencoders"): the dimensions u whose posterior mean
  varies over the images, Var_x(E_q(u|x)[u]) > 0.01; the others carry no information about the image."""

from __future__ import annotations

import numpy as np

ACTIVE_UNIT_THRESHOLD = 0.01
PARTITIONS = {"train": 0, "val": 1, "test": 2}


def kl_per_image(mu: np.ndarray, logvar: np.ndarray) -> float:
    mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
    return float((0.5 * (mu**2 + np.exp(logvar) - 1 - logvar)).sum(1).mean())


def active_units(mu: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Dimensions whose posterior mean has a variance over images (population variance) above `threshold`."""
    return int((mu.astype(np.float64).var(0) > threshold).sum())


def latent_statistics(latents: dict, split: str = "test") -> dict | None:
    """svm_report.json's "latent" section; None for features without a posterior (e.g. VGG-FC)."""
    mu, logvar = latents["mu"], latents["logvar"]
    if logvar.shape != mu.shape:
        return None
    rows = latents["partition"] == PARTITIONS[split]
    return {"kl_per_image": kl_per_image(mu[rows], logvar[rows]), "active_units": active_units(mu[rows]),
            "units": mu.shape[1], "split": split}
