"""Model shapes, parameter counts and initialisation."""

import pytest
import torch
from torch import nn

from dfcvae_dist.config import ModelConfig
from dfcvae_dist.families import get_family
from dfcvae_dist.models import DCGAN, VAE
from dfcvae_dist.models.vae import EdgePad


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def conv_params(c_in, c_out, k, bias=True):
    return c_in * c_out * k * k + (c_out if bias else 0)


def test_dfcvae_64_matches_figure_2():
    model = VAE(64, 100, 32)
    enc = sum(conv_params(a, b, 4) for a, b in [(3, 32), (32, 64), (64, 128), (128, 256)])
    enc += 2 * (32 + 64 + 128 + 256) + 2 * (256 * 16 * 100 + 100)  # batch norms, mean and log-var heads
    dec = 100 * 4096 + 4096 + sum(conv_params(a, b, 3) for a, b in [(256, 128), (128, 64), (64, 32), (32, 3)])
    dec += 2 * (128 + 64 + 32)
    assert n_params(model.encoder) == enc and n_params(model.decoder) == dec
    assert n_params(model) == 2_312_811
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [((4, 4), (2, 2), c)
                                                                          for c in (32, 64, 128, 256)]
    ups = [m for m in model.decoder.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == 4 and all(u.mode == "nearest" for u in ups)
    assert sum(isinstance(m, EdgePad) for m in model.decoder.modules()) == 4


@pytest.mark.parametrize("size,params", [(32, 876_011), (64, 2_312_811), (128, 6_824_811)])
def test_vae_shapes_every_size(size, params):
    model = VAE(size)
    x = torch.rand(3, 3, size, size)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (3, 100)
    assert 0 <= x_hat.min() and x_hat.max() <= 1  # same [0, 1] space as the input
    assert n_params(model) == params
    assert model.sample(5).shape == (5, 3, size, size)


def test_128_variant_is_the_released_codes():
    model = VAE(128)
    assert [m.out_channels for m in model.encoder.modules() if isinstance(m, nn.Conv2d)] == [32, 64, 128, 256, 512]
    assert model.decoder.top_channels == 512


def test_dcgan_64():
    gan = DCGAN(100, 64, 64)
    assert n_params(gan.generator) == 3_576_704 and n_params(gan.discriminator) == 2_765_568
    fake = gan.sample(4)
    assert fake.shape == (4, 3, 64, 64) and 0 <= fake.min() and fake.max() <= 1
    assert gan.discriminator(fake).shape == (4,)


def test_normal_init_and_default_init():
    torch.manual_seed(0)
    normal = get_family("dfcvae").build_model(ModelConfig(name="dfcvae", init="normal"))
    default = get_family("dfcvae").build_model(ModelConfig(name="dfcvae", init="default"))
    w = normal.encoder.features[3].weight
    assert abs(w.std().item() - 0.02) < 0.002 and normal.encoder.features[0].bias.abs().max() == 0
    assert abs(default.encoder.features[3].weight.std().item() - 0.02) > 0.005
    assert isinstance(get_family("dcgan").build_model(ModelConfig(name="dcgan", base_channels=64)), DCGAN)


def test_edge_pad_matches_replication_pad_in_values_and_gradients():
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    weights = torch.randn(2, 3, 7, 9)
    (EdgePad()(x) * weights).sum().backward()
    (nn.ReplicationPad2d(1)(y) * weights).sum().backward()
    assert torch.equal(EdgePad()(x), nn.ReplicationPad2d(1)(y))
    assert torch.allclose(x.grad, y.grad, rtol=0, atol=1e-6)
