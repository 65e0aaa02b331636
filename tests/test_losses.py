"""Feature perceptual loss, KL and pixel loss: the paper's formulas, the frozen loss network, precision."""

import logging
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import vgg19

from dfcvae_dist.errors import UserError
from dfcvae_dist.losses import FeaturePerceptualLoss, kl_divergence, load_network, pixel_loss, vae_loss
from dfcvae_dist.losses.feature_networks import vgg_relu_nodes
from dfcvae_dist.models import VAE

PAPER_123 = ["relu1_2", "relu2_1", "relu3_1"]
VGG19_LAYERS = {name: int(node.removeprefix("features.")) for name, node in vgg_relu_nodes("vgg19").items()}


def load_vgg19(weights, seed=0):
    return load_network("vgg19", weights, seed)


def kept_features(loss) -> list[int]:
    """The indices of VGG's `features` the truncated network kept."""
    return sorted(int(name) for name, _ in loss.features.net.features.named_children())


@pytest.fixture(scope="module")
def loss123():
    return FeaturePerceptualLoss(PAPER_123, feature_scale=3.0, weights="random", seed=1)


def test_layer_names_map_to_torchvision_indices():
    expected = {"relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu5_1": 29, "relu5_4": 35}
    assert {k: VGG19_LAYERS[k] for k in expected} == expected
    features = vgg19(weights=None).features
    for name, index in VGG19_LAYERS.items():
        assert isinstance(features[index], nn.ReLU) and isinstance(features[index - 1], nn.Conv2d), name


def test_loss_network_is_truncated_after_deepest_layer(loss123):
    assert kept_features(loss123) == list(range(VGG19_LAYERS["relu3_1"] + 1))
    deep = FeaturePerceptualLoss(["relu3_1", "relu4_1", "relu5_1"], weights="random")
    assert kept_features(deep) == list(range(30))
    assert not hasattr(deep.features.net, "classifier")


def test_matches_straightforward_formula(loss123):
    """Independent computation: full VGG19 with the same weights, forward hooks, explicit sums."""
    torch.manual_seed(0)
    x, x_hat = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    full, _ = load_vgg19("random", seed=1)
    acts = {}
    for name in PAPER_123:
        full.features[VGG19_LAYERS[name]].inplace = False
        full.features[VGG19_LAYERS[name]].register_forward_hook(
            lambda m, i, o, n=name: acts.setdefault(n, []).append(o))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        full((x - mean) / std)
        full((x_hat - mean) / std)
    got = loss123(x, x_hat)
    for name in PAPER_123:
        a, b = (acts[name][0] * 3.0).double().numpy(), (acts[name][1] * 3.0).double().numpy()
        per_image = []
        for i in range(a.shape[0]):
            c, h, w = a[i].shape
            total = 0.0
            for ch in range(c):
                total += np.sum((a[i, ch] - b[i, ch]) ** 2)
            per_image.append(total / (2 * c * w * h))
        assert got[name].item() == pytest.approx(np.mean(per_image), rel=1e-5), name


def test_layer_weights_scale_each_layer():
    plain = FeaturePerceptualLoss(PAPER_123, weights="random")
    weighted = FeaturePerceptualLoss(PAPER_123, [1.0, 0.5, 2.0], weights="random")
    x, x_hat = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    a, b = plain(x, x_hat), weighted(x, x_hat)
    assert b["relu2_1"].item() == pytest.approx(0.5 * a["relu2_1"].item(), rel=1e-6)
    assert b["relu3_1"].item() == pytest.approx(2 * a["relu3_1"].item(), rel=1e-6)
    with pytest.raises(UserError, match="layer_weights has 2 entries for 3 layers"):
        FeaturePerceptualLoss(PAPER_123, [1.0, 2.0], weights="random")


def test_kl_and_pixel_loss_formulas():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 10), torch.randn(4, 10) * 0.3
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(1).mean()
    assert kl_divergence(mu, logvar).item() == pytest.approx(expected.item(), rel=1e-5)
    x, x_hat = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    assert pixel_loss(x, x_hat).item() == pytest.approx(((x - x_hat) ** 2).sum().item() / 4, rel=1e-5)


def test_total_is_alpha_times_kl_plus_beta_times_reconstruction(loss123):
    """Against the terms computed apart, with alpha != 1 so that a dropped or swapped weight shows."""
    torch.manual_seed(0)
    x, x_hat = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    mu, logvar = torch.randn(2, 100), torch.randn(2, 100)
    kl, perceptual = kl_divergence(mu, logvar).item(), sum(loss123(x, x_hat).values()).item()
    terms = vae_loss(x, x_hat, mu, logvar, alpha=0.3, beta=0.8, reconstruction=loss123)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-6) and terms["rec"].item() == pytest.approx(perceptual)
    assert terms["rec"].item() == pytest.approx(sum(terms[f"rec_{n}"].item() for n in PAPER_123), rel=1e-6)
    assert terms["total"].item() == pytest.approx(0.3 * kl + 0.8 * perceptual, rel=1e-6)
    pixel = vae_loss(x, x_hat, mu, logvar, alpha=0.3, beta=0.8)
    assert set(pixel) == {"kl", "rec", "total"}
    assert pixel["total"].item() == pytest.approx(0.3 * kl + 0.8 * pixel_loss(x, x_hat).item(), rel=1e-6)


def test_only_x_hat_goes_through_vgg_with_autograd(loss123):
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    x_hat = torch.rand(2, 3, 32, 32, requires_grad=True)
    sum(loss123(x, x_hat).values()).backward()
    assert x.grad is None and x_hat.grad is not None


def test_vgg_frozen_absent_from_optimizer_and_unchanged_by_a_step(loss123):
    torch.manual_seed(0)
    model = VAE(32)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    before = {k: v.clone() for k, v in loss123.state_dict().items()}
    vgg_ids = {id(p) for p in loss123.parameters()}
    assert all(not p.requires_grad for p in loss123.parameters())
    assert not vgg_ids & {id(p) for group in optimizer.param_groups for p in group["params"]}
    x = torch.rand(4, 3, 32, 32)
    loss123.train()  # asking for train mode must not leave eval mode
    assert not loss123.features.training
    x_hat, mu, logvar = model(x)
    vae_loss(x, x_hat, mu, logvar, 1.0, 0.8, loss123)["total"].backward()
    optimizer.step()
    assert all(p.grad is None for p in loss123.parameters())
    after = loss123.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finite_gradient_for_every_trainable_parameter_64():
    torch.manual_seed(0)
    model = VAE(64)
    loss = FeaturePerceptualLoss(PAPER_123, feature_scale=57.6, weights="random")
    x = torch.rand(4, 3, 64, 64)
    x_hat, mu, logvar = model(x)
    vae_loss(x, x_hat, mu, logvar, 1.0, 0.8, loss)["total"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 0.02), (torch.bfloat16, 0.08)])
def test_reduced_precision_gradient_close_to_fp32(dtype, tolerance):
    """Relative L2 error of d loss / d x_hat with the loss network in fp16/bf16 vs fp32: small, yet not zero
    (the network really ran in that dtype)."""
    torch.manual_seed(0)
    x, x_hat = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    grads = []
    for d in (torch.float32, dtype):
        loss = FeaturePerceptualLoss(PAPER_123, weights="random", seed=2, dtype=d)
        assert loss.dtype == d and all(p.dtype == d for p in loss.parameters())
        leaf = x_hat.clone().requires_grad_(True)
        total = sum(loss(x, leaf).values())
        assert total.dtype == torch.float32  # reduced in fp32
        total.backward()
        grads.append(leaf.grad)
    rel = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert 0 < rel < tolerance


def test_compiled_loss_matches_eager_values_and_gradient():
    """train.compile=loss: the same per-layer losses and d loss / d x_hat as the eager loss network."""
    from dfcvae_dist.config import LossConfig

    torch.manual_seed(0)
    x, x_hat = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    results = []
    for compiled in (False, True):
        cfg = LossConfig(network_weights="random", network_seed=2, feature_scale=3.0, layers=PAPER_123)
        loss = FeaturePerceptualLoss.from_config(cfg, torch.device("cpu"))
        if compiled:
            loss.compile()  # what the recipe does under train.compile=loss
        leaf = x_hat.clone().requires_grad_(True)
        layers = loss(x, leaf)
        sum(layers.values()).backward()
        results.append((torch.stack(list(layers.values())).detach(), leaf.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)


def test_network_dtype_auto_is_fp32_on_cpu():
    from dfcvae_dist.config import LossConfig

    loss = FeaturePerceptualLoss.from_config(LossConfig(network_weights="random", layers=PAPER_123),
                                             torch.device("cpu"))
    assert loss.dtype == torch.float32


def test_random_weights_seeded_and_announced(caplog):
    with caplog.at_level(logging.WARNING):
        a, source = load_vgg19("random", seed=3)
    b, _ = load_vgg19("random", seed=3)
    c, _ = load_vgg19("random", seed=4)
    assert source == "random(seed=3)" and "RANDOM weights" in caplog.text
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_local_weight_file_full_or_features_only(tmp_path):
    model, _ = load_vgg19("random", seed=5)
    torch.save(model.state_dict(), tmp_path / "full.pth")
    torch.save(model.features.state_dict(), tmp_path / "features.pth")
    for name in ("full.pth", "features.pth"):
        loaded, source = load_vgg19(str(tmp_path / name))
        assert source == f"file:{tmp_path / name}"
        assert torch.equal(loaded.features[28].weight, model.features[28].weight)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="bad.pth: does not match torchvision's vgg19"):
        load_vgg19(str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="neither imagenet, random nor an existing file"):
        load_vgg19(str(tmp_path / "nope.pth"))


class Boom:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('PWNED').touch()",))


def test_malicious_weight_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"features.0.weight": Boom()}, f)
    with pytest.raises(UserError, match="evil.pth: not a loadable vgg19 state dict"):
        load_vgg19(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "PWNED").exists()


def test_imagenet_weights_not_cached_and_not_downloadable_is_one_line_saying_which_file_where(unreachable_hub):
    with pytest.raises(UserError) as err:
        load_vgg19("imagenet")
    message = str(err.value)
    assert "vgg19-dcbb9e9d.pth" in message and str(unreachable_hub) in message
    assert "tools/fetch_vgg19.py" in message and "Connection refused" in message and "\n" not in message
