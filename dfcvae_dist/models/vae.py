"""The DFC-VAE / plain VAE networks of the paper's Figure 2 (and the released code's 128x128 variant).

Pixel space: the encoder takes images in [0, 1] and the decoder ends in a sigmoid, so reconstructions live
in the same [0, 1] space (the loss network normalises to ImageNet statistics itself).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _blocks_for(image_size: int) -> int:
    blocks = int(math.log2(image_size // 4))
    if 4 * 2**blocks != image_size:
        raise ValueError(f"image size {image_size} is not 4 x a power of two")
    return blocks


class Encoder(nn.Module):
    """4x4 stride-2 convolutions (ndf, 2ndf, ...) with batch norm and LeakyReLU(0.2), then mean and log-variance
    heads."""

    def __init__(self, image_size: int = 64, latent_dim: int = 100, base_channels: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for i in range(_blocks_for(image_size)):
            c_out = base_channels * 2**i
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.fc_mu = nn.Linear(c_in * 16, latent_dim)
        self.fc_logvar = nn.Linear(c_in * 16, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.fc_mu(h), self.fc_logvar(h)


class EdgePad(nn.Module):
    """ReplicationPad2d(1) written as concatenated edge rows and columns: the same values and gradients, and a
    backward that is deterministic on CUDA (ReplicationPad2d's is not: train.deterministic would refuse it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
        return torch.cat([x[..., :1], x, x[..., -1:]], dim=3)


class Decoder(nn.Module):
    """Linear to (C, 4, 4), then blocks of nearest x2 upsampling, replication pad 1, 3x3 convolution,
    batch norm and LeakyReLU(0.2); the last block has 3 channels and no norm/activation, then a sigmoid."""

    def __init__(self, image_size: int = 64, latent_dim: int = 100, base_channels: int = 32):
        super().__init__()
        blocks = _blocks_for(image_size)
        self.top_channels = base_channels * 2 ** (blocks - 1)
        self.fc = nn.Linear(latent_dim, self.top_channels * 16)
        layers, c_in = [], self.top_channels
        for i in range(blocks):
            last = i == blocks - 1
            c_out = 3 if last else c_in // 2
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), EdgePad(), nn.Conv2d(c_in, c_out, 3, 1)]
            if not last:
                layers += [nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        self.net = nn.Sequential(*layers, nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, self.top_channels, 4, 4))


class VAE(nn.Module):
    """Encoder + reparameterisation + decoder. The same network serves DFC-VAE and PVAE; only the loss differs."""

    def __init__(self, image_size: int = 64, latent_dim: int = 100, base_channels: int = 32):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = Encoder(image_size, latent_dim, base_channels)
        self.decoder = Decoder(image_size, latent_dim, base_channels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        return self.decode(torch.randn(n, self.latent_dim, generator=generator).to(device))
