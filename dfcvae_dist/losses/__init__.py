from dfcvae_dist.losses.gan import discriminator_loss, generator_loss
from dfcvae_dist.losses.feature_networks import FeatureNetwork, load_network
from dfcvae_dist.losses.perceptual import FeaturePerceptualLoss
from dfcvae_dist.losses.vae import kl_divergence, pixel_loss, vae_loss

__all__ = ["FeaturePerceptualLoss", "FeatureNetwork", "load_network", "kl_divergence", "pixel_loss",
           "vae_loss", "discriminator_loss", "generator_loss"]
