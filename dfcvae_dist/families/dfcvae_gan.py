"""dfcvae-gan: DFC-VAE plus an adversarial term, the future work the paper's conclusion names (after Larsen et
al.'s VAE/GAN). A discriminator learns to tell images from reconstructions and from samples of N(0, I); the VAE is
trained on alpha x KL + beta x the feature perceptual loss + `loss.adversarial_weight` x the decoder's
non-saturating GAN loss on the same reconstructions and samples. The perceptual and KL terms are the DFC-VAE's."""

from __future__ import annotations

from torch import nn

from dfcvae_dist.config import Config, ModelConfig
from dfcvae_dist.families.vae import VAEFamily, loss_network_line, perceptual_metrics
from dfcvae_dist.metrics import Metric
from dfcvae_dist.models import VAE, Discriminator, init_weights


class VAEWithDiscriminator(nn.Module):
    """The trained model: `vae` (what encodes, decodes and samples) and its `discriminator` (training only)."""

    def __init__(self, vae: VAE, discriminator: Discriminator):
        super().__init__()
        self.vae, self.discriminator = vae, discriminator


class DFCVAEGAN(VAEFamily):
    name = "dfcvae-gan"
    title = "DFC-VAE-GAN (feature perceptual loss and a discriminator)"
    feature_network = True
    rec_metric = "rec_perceptual"
    accumulates = False

    def unused_keys(self, cfg: Config) -> set[str]:
        return super().unused_keys(cfg) - {"loss.adversarial_weight"}

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        discriminator = Discriminator(model_cfg.base_channels, model_cfg.image_size)
        return VAEWithDiscriminator(super().build_model(model_cfg), init_weights(discriminator, model_cfg.init))

    def inference_model(self, model: nn.Module) -> nn.Module:
        return model.vae

    def build_recipe(self, cfg: Config, accelerator, health, memory_format):
        from dfcvae_dist.training.recipes import VAEGANRecipe

        return VAEGANRecipe(cfg, accelerator, health, memory_format, self.build_model(cfg.model),
                            self.reconstruction_loss(cfg, accelerator, memory_format), self.rec_metric)

    def metrics(self, cfg: Config | None = None) -> list[Metric]:
        weight = f"{cfg.loss.adversarial_weight:g}" if cfg else "`loss.adversarial_weight`"
        kl = [m for m in super().metrics(cfg) if m.name == "train/kl"]
        return [Metric("train/total", f"the VAE's objective: the DFC-VAE's + {weight} × `train/adversarial`",
                       "that of its terms"), *kl, *perceptual_metrics(cfg),
                Metric("val/total", "the DFC-VAE's objective (without the adversarial term) on the first "
                       "`train.val_batches` batches per rank of the val split", "that of its terms"),
                Metric("train/adversarial", "the decoder's non-saturating binary cross-entropy on reconstructions and "
                       "samples", "nats"),
                Metric("train/loss_d", "the discriminator's binary cross-entropy on images against reconstructions "
                       "and samples", "nats")]

    def loss_lines(self, cfg: Config, feature_weights: str) -> list[str]:
        return [loss_network_line(cfg, feature_weights),
                f"**Adversarial term**: weight {cfg.loss.adversarial_weight:g}; a DCGAN discriminator on images "
                "against reconstructions and samples."]


FAMILY = DFCVAEGAN()
