from dfcvae_dist.losses.gan import discriminator_loss, generator_loss
from dfcvae_dist.losses.perceptual import VGG19_LAYERS, FeaturePerceptualLoss, VGG19Features, load_vgg19
from dfcvae_dist.losses.vae import kl_divergence, pixel_loss, vae_loss

__all__ = ["FeaturePerceptualLoss", "VGG19Features", "VGG19_LAYERS", "load_vgg19", "kl_divergence", "pixel_loss",
           "vae_loss", "discriminator_loss", "generator_loss"]
