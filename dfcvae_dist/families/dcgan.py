"""DCGAN (Radford et al.), the paper's GAN baseline: a generator and a discriminator, no encoder, so it is
evaluated by its samples alone (FID)."""

from __future__ import annotations

from torch import nn

from dfcvae_dist.config import Config, ModelConfig
from dfcvae_dist.families.base import ModelFamily
from dfcvae_dist.metrics import Metric
from dfcvae_dist.models import DCGAN, init_weights


class DCGANFamily(ModelFamily):
    name = "dcgan"
    title = "DCGAN"
    in_paper = True
    encodes = False
    validates = False
    evaluations = ("quality",)
    accumulates = False

    def unused_keys(self, cfg: Config) -> set[str]:
        return super().unused_keys(cfg) | {key for key in cfg.flat() if key.startswith("loss.")}

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        return init_weights(DCGAN(model_cfg.latent_dim, model_cfg.base_channels, model_cfg.image_size), model_cfg.init)

    def build_recipe(self, cfg: Config, accelerator, health, memory_format):
        from dfcvae_dist.training.recipes import GANRecipe

        return GANRecipe(cfg, accelerator, health, memory_format, self.build_model(cfg.model))

    def metrics(self, cfg: Config | None = None) -> list[Metric]:
        return [Metric("train/total", "`train/loss_d` + `train/loss_g`", "nats"),
                Metric("train/loss_d", "the discriminator's binary cross-entropy on real plus fake images", "nats"),
                Metric("train/loss_g", "the generator's non-saturating binary cross-entropy", "nats")]

    def images_caption(self) -> str:
        return "`samples`, the generator's images of one fixed z."

    def samples_label(self, run_name: str) -> str:
        return f"{run_name} (own z)"  # a latent space of its own: the shared z means nothing to it


FAMILY = DCGANFamily()
