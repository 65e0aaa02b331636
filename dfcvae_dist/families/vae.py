"""What the VAE families (DFC-VAE, PVAE, dfcvae-gan) share: the paper's network and the VAE objective,
alpha x KL + beta x a reconstruction term that each family names."""

from __future__ import annotations

import torch
from torch import nn

from dfcvae_dist.config import Config, ModelConfig
from dfcvae_dist.families.base import ModelFamily
from dfcvae_dist.losses.vae import pixel_loss
from dfcvae_dist.metrics import Metric
from dfcvae_dist.models import VAE, init_weights


class VAEFamily(ModelFamily):
    rec_metric = ""  # the reconstruction term's name: train/<rec_metric>

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        return init_weights(VAE(model_cfg.image_size, model_cfg.latent_dim, model_cfg.base_channels), model_cfg.init)

    def reconstruction_loss(self, cfg: Config, accelerator, memory_format: torch.memory_format):
        """`(x, x_hat) -> term` or `{part: term}`, in `losses.vae_loss`: the feature perceptual loss of a family
        with a feature network, else the pixel loss."""
        if not self.feature_network:
            return pixel_loss
        from dfcvae_dist.losses import FeaturePerceptualLoss

        with accelerator.main_process_first():  # the main process fetches ImageNet weights, the others read the cache
            return FeaturePerceptualLoss.from_config(cfg.loss, accelerator.device).to(memory_format=memory_format)

    def build_recipe(self, cfg: Config, accelerator, health, memory_format):
        from dfcvae_dist.training.recipes import VAERecipe

        return VAERecipe(cfg, accelerator, health, memory_format, self.build_model(cfg.model),
                         self.reconstruction_loss(cfg, accelerator, memory_format), self.rec_metric)

    def metrics(self, cfg: Config | None = None) -> list[Metric]:
        alpha, beta = (f"{cfg.loss.alpha:g}", f"{cfg.loss.beta:g}") if cfg else ("`loss.alpha`", "`loss.beta`")
        return [Metric("train/total", f"{alpha} × `train/kl` + {beta} × `train/{self.rec_metric}`",
                       "that of its terms"),
                Metric("train/kl", "KL(q(z|x) ‖ N(0, I)) summed over z; batch mean", "nats per image"),
                Metric("val/total", "`train/total` on the first `train.val_batches` batches per rank of the val split "
                       "(every `train.val_every_steps`)", "as `train/total`")]


def perceptual_metrics(cfg: Config | None) -> list[Metric]:
    """train/rec_perceptual and its per-layer terms."""
    unit = f"squared {cfg.loss.network if cfg else '`loss.network`'} feature units (× `loss.feature_scale`²)"
    layers = f" ({', '.join(cfg.loss.layers)})" if cfg else ""
    return [Metric("train/rec_perceptual", "feature perceptual loss: the sum over `loss.layers` of "
                   "`train/rec_perceptual/<layer>`", unit),
            Metric("train/rec_perceptual/<layer>", f"one per layer{layers}: half the mean squared difference of the "
                   "layer's activations (× `loss.feature_scale`) between input and reconstruction, × the layer's "
                   "weight; batch mean", unit)]


def loss_network_line(cfg: Config, feature_weights: str) -> str:
    loss = cfg.loss
    return (f"**Loss network**: {loss.network} `{feature_weights}`, layers {', '.join(loss.layers)}, features ×"
            f"{loss.feature_scale:g}.")
