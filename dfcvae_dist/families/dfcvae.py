"""DFC-VAE (the paper's): the VAE trained on alpha x KL + beta x the feature perceptual loss of a frozen feature
network (VGG19 by default)."""

from __future__ import annotations

from dfcvae_dist.config import Config
from dfcvae_dist.families.vae import VAEFamily, loss_network_line, perceptual_metrics
from dfcvae_dist.metrics import Metric


class DFCVAE(VAEFamily):
    name = "dfcvae"
    title = "DFC-VAE (feature perceptual loss)"
    in_paper = True
    feature_network = True
    rec_metric = "rec_perceptual"

    def metrics(self, cfg: Config | None = None) -> list[Metric]:
        return super().metrics(cfg) + perceptual_metrics(cfg)

    def loss_lines(self, cfg: Config, feature_weights: str) -> list[str]:
        return [loss_network_line(cfg, feature_weights)]


FAMILY = DFCVAE()
