"""PVAE, the paper's plain VAE: the DFC-VAE network trained on alpha x KL + beta x the pixel loss."""

from __future__ import annotations

from dfcvae_dist.config import Config
from dfcvae_dist.families.vae import VAEFamily
from dfcvae_dist.metrics import Metric


class PVAE(VAEFamily):
    name = "pvae"
    title = "PVAE (pixel loss)"
    in_paper = True
    rec_metric = "rec_pixel"

    def metrics(self, cfg: Config | None = None) -> list[Metric]:
        return super().metrics(cfg) + [Metric("train/rec_pixel", "squared pixel error summed over the image's pixels "
                                              "and channels ([0, 1] pixels); batch mean",
                                              "squared intensity per image")]


FAMILY = PVAE()
