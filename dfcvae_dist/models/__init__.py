"""The networks: DFC-VAE, PVAE and dfcvae-gan share `VAE`; DCGAN is a generator/discriminator pair. Each model family
(`dfcvae_dist/families/`) builds its own from them."""

from __future__ import annotations

from torch import nn

from dfcvae_dist.models.dcgan import DCGAN, Discriminator, Generator
from dfcvae_dist.models.vae import VAE, Decoder, Encoder

__all__ = ["VAE", "Encoder", "Decoder", "DCGAN", "Generator", "Discriminator", "init_weights"]


def init_weights(model: nn.Module, scheme: str) -> nn.Module:
    """`normal`: N(0, 0.02) for (transposed) convolutions and linears, N(1, 0.02) for batch-norm scales,
    zero biases (the released code and DCGAN); `default`: leave PyTorch's init."""
    if scheme == "default":
        return model
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return model
