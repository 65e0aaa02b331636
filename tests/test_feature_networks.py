"""Feature networks of the perceptual loss (`loss.network`): the built-ins by torchvision's node names (VGG also
by the paper's), truncated, frozen, on one weights policy; your own module by `package.module:function`."""

import logging

import pytest
import torch
from torchvision.models import get_model

from dfcvae_dist.config import load_config
from dfcvae_dist.errors import UserError
from dfcvae_dist.losses import FeaturePerceptualLoss
from dfcvae_dist.losses.feature_networks import FeatureNetwork, layer_names, load_network, vgg_relu_nodes

IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))


def test_resnet18_layers_are_torchvisions_own_activations_and_nothing_deeper_is_kept():
    """Against the same seeded resnet18 run by hand, module by module."""
    net = FeatureNetwork("resnet18", ["relu", "layer1", "layer2.0.relu_1"], weights="random", seed=3)
    assert not any(name.startswith(("layer3", "layer4", "fc")) for name, _ in net.net.named_modules())
    with torch.random.fork_rng():
        torch.manual_seed(3)
        reference = get_model("resnet18", weights=None).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        h = (x - IMAGENET[0]) / IMAGENET[1]
        relu = reference.relu(reference.bn1(reference.conv1(h)))
        layer1 = reference.layer1(reference.maxpool(relu.clone()))
        layer2_0 = reference.layer2[0](layer1.clone())
        got = net(x)
    torch.testing.assert_close(got["relu"], relu)
    torch.testing.assert_close(got["layer1"], layer1)
    torch.testing.assert_close(got["layer2.0.relu_1"], layer2_0)
    assert all(not p.requires_grad for p in net.parameters()) and not net.train().training


def test_vgg16_takes_the_papers_layer_names_too():
    assert vgg_relu_nodes("vgg16")["relu3_3"] == "features.15" and vgg_relu_nodes("vgg19")["relu3_4"] == "features.17"
    net = FeatureNetwork("vgg16", ["relu2_2", "features.15"], weights="random")
    assert set(net(torch.rand(1, 3, 16, 16))) == {"relu2_2", "features.15"}
    assert max(int(n) for n, _ in net.net.features.named_children()) == 15


def test_a_networks_default_layers_and_a_wrong_layer_are_settled_when_the_config_loads():
    assert load_config(None, ["loss.network=resnet50"]).loss.layers == ["relu", "layer1", "layer2"]
    assert load_config(None, ["loss.network=vgg16"]).loss.layers == ["relu1_2", "relu2_1", "relu3_1"]
    with pytest.raises(UserError, match=r"loss.layers: 'layer9' is not a layer of resnet18 \(loss.layers=null takes "
                                        r"its default layers\); its layers: conv1, bn1, relu, maxpool, layer1, layer2"):
        load_config(None, ["loss.network=resnet18", "loss.layers=[relu, layer9]"])
    with pytest.raises(UserError, match="loss.network 'alexnet' is neither one of vgg19, vgg16, resnet18, resnet50 nor "
                                        "package.module:function"):
        load_config(None, ["loss.network=alexnet"])
    assert "layer4.1.relu_1" in layer_names("resnet18")


def test_the_old_vgg_keys_still_load_as_the_networks_keys(tmp_path):
    (tmp_path / "old.yaml").write_text("loss:\n  vgg_weights: random\n  vgg_dtype: fp32\n  vgg_seed: 4\n")
    loss = load_config(tmp_path / "old.yaml", ["loss.vgg_seed=5"]).loss
    assert (loss.network, loss.network_weights, loss.network_dtype, loss.network_seed) == ("vgg19", "random", "fp32", 5)


CUSTOM = '''
import torch
from torch import nn


def tiny(weights):
    assert weights == "mine.pt"
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 2, 1))


def not_a_module(weights):
    return 42
'''


def test_your_own_network_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["loss.network=mynets:tiny", "loss.layers=[1, 3]", "loss.network_weights=mine.pt"])
    loss = FeaturePerceptualLoss.from_config(cfg.loss, torch.device("cpu"))
    assert loss.weights_source == "mine.pt"
    assert sorted(loss(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))) == ["1", "3"]
    assert "4" not in dict(loss.features.net.named_children())  # truncated after the deepest layer used
    assert all(not p.requires_grad for p in loss.parameters())
    with pytest.raises(UserError, match=r"loss.layers \['9'\] for loss.network 'mynets:tiny': .*9"):
        FeatureNetwork("mynets:tiny", ["9"], weights="mine.pt")
    with pytest.raises(UserError, match="loss.network 'mynets:not_a_module': returned a int, not a torch.nn.Module"):
        FeatureNetwork("mynets:not_a_module", ["1"])
    with pytest.raises(UserError, match=r"loss.network 'nosuchpackage.nets:f': cannot import it \(No module named"):
        FeatureNetwork("nosuchpackage.nets:f", ["1"])


def test_random_weights_of_any_network_are_seeded_and_announced(caplog):
    with caplog.at_level(logging.WARNING):
        a, source = load_network("resnet18", "random", seed=3)
    b, _ = load_network("resnet18", "random", seed=3)
    assert source == "random(seed=3)" and "resnet18 loss network has RANDOM weights" in caplog.text
    assert torch.equal(a.conv1.weight, b.conv1.weight)


@pytest.mark.parametrize("network", ["vgg19", "vgg16"])
def test_a_headless_random_vgg_has_torchvisions_convolutions(network):
    """A feature network's random VGG skips the classifier's second draw: its convolutions, which runs trained on
    random weights depend on (and resume with), are still those of torchvision's random VGG of the same seed."""
    whole, _ = load_network(network, "random", seed=5)
    headless, source = load_network(network, "random", seed=5, head=False)
    assert source == "random(seed=5)"
    for (name, a), b in zip(whole.features.state_dict().items(), headless.features.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with_head = FeatureNetwork(network, ["relu1_2", "classifier.0"], weights="random", seed=5)  # keeps the head
    assert torch.equal(with_head.net.get_submodule("classifier.0").weight, whole.classifier[0].weight)


def test_imagenet_weights_of_resnet18_not_cached_name_its_file(unreachable_hub):
    with pytest.raises(UserError) as err:
        load_network("resnet18", "imagenet")
    assert "resnet18-f37072fd.pth" in str(err.value) and str(unreachable_hub) in str(err.value)
    assert "--network resnet18" in str(err.value)
