"""The VAE objective: alpha * KL + beta * reconstruction (feature perceptual, pixel, or a family's own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per image, summed over z, averaged over the batch (in fp32)."""
    mu, logvar = mu.float(), logvar.float()
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()


def pixel_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image (a Gaussian log-likelihood up to a constant), batch mean."""
    return F.mse_loss(x_hat.float(), x.float(), reduction="sum") / x.shape[0]


def vae_loss(x, x_hat, mu, logvar, alpha: float, beta: float, reconstruction=pixel_loss) -> dict[str, torch.Tensor]:
    """Loss terms for logging plus `total`. `reconstruction(x, x_hat)` gives the reconstruction term, or its
    named parts (the feature perceptual loss's layers: `rec_<layer>`, summed into `rec`)."""
    terms = {"kl": kl_divergence(mu, logvar)}
    rec = reconstruction(x, x_hat)
    if isinstance(rec, dict):
        terms.update({f"rec_{name}": value for name, value in rec.items()})
        rec = sum(rec.values())
    terms["rec"] = rec
    terms["total"] = alpha * terms["kl"] + beta * terms["rec"]
    return terms
