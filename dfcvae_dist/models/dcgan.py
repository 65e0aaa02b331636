"""DCGAN 64x64 (Radford et al.): transposed-convolution generator and strided-convolution discriminator.

The generator ends in tanh; `Generator.forward` maps it to [0, 1] and the discriminator maps its [0, 1]
input to [-1, 1], so the GAN shares the VAEs' pixel space and data pipeline.
"""

from __future__ import annotations

import torch
from torch import nn


class Generator(nn.Module):
    def __init__(self, latent_dim: int = 100, base_channels: int = 64, image_size: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        blocks = {32: 3, 64: 4, 128: 5}[image_size]
        c = base_channels * 2 ** (blocks - 1)
        layers = [nn.ConvTranspose2d(latent_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        for _ in range(blocks - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.net(z.view(z.shape[0], -1, 1, 1)) + 1) / 2

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        return self(torch.randn(n, self.latent_dim, generator=generator).to(device))


class Discriminator(nn.Module):
    def __init__(self, base_channels: int = 64, image_size: int = 64):
        super().__init__()
        blocks = {32: 3, 64: 4, 128: 5}[image_size]
        c = base_channels
        layers = [nn.Conv2d(3, c, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for _ in range(blocks - 1):
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c * 2), nn.LeakyReLU(0.2, True)]
            c *= 2
        layers += [nn.Conv2d(c, 1, 4, 1, 0, bias=False), nn.Flatten()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1).squeeze(1)  # logits


class DCGAN(nn.Module):
    """Both networks in one module (one checkpoint, one `state_dict`); trained with two optimizers."""

    def __init__(self, latent_dim: int = 100, base_channels: int = 64, image_size: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        self.generator = Generator(latent_dim, base_channels, image_size)
        self.discriminator = Discriminator(base_channels, image_size)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The generator's images of latents z, (N, latent_dim) or (N, latent_dim, 1, 1)."""
        return self.generator(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.generator.sample(n, generator)
