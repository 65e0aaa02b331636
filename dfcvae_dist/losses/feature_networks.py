"""Feature networks of the perceptual loss (`loss.network`): a frozen classifier truncated after the deepest layer
the loss reads, mapping images in [0, 1] to `{layer: activation}`.

- `vgg19` (the paper's) and `vgg16`: layers named as the paper names them, `relu{block}_{i}` (`relu1_2` is the
  second ReLU of the first block), or by their torchvision node names (`features.3`);
- `resnet18`, `resnet50`: torchvision's node names (`relu`, `layer1`, `layer2.0.relu_1`, ...; a module's name means
  its output);
- `package.module:function`: your own; `function(weights)` gets `loss.network_weights` and returns an `nn.Module`
  taking ImageNet-normalised images; its layers are its node names.

Node names are those of `torchvision.models.feature_extraction`, which also does the truncation: the traced graph
keeps only what the requested layers need. Weights (`loss.network_weights`): `imagenet` (torchvision's weights, from
the torch hub cache or downloaded), `random` (seeded; logged as such, never the paper's loss) or a state-dict file.
"""

from __future__ import annotations

import functools
import importlib
import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.models.vgg import cfgs as vgg_cfgs

from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.imagenet import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)
BUILTIN_NETWORKS = ("vgg19", "vgg16", "resnet18", "resnet50")
VGG_CONFIGS = {"vgg19": "E", "vgg16": "D"}  # torchvision's layer lists
DEFAULT_LAYERS = {"vgg19": ["relu1_2", "relu2_1", "relu3_1"], "vgg16": ["relu1_2", "relu2_1", "relu3_1"],
                  "resnet18": ["relu", "layer1", "layer2"], "resnet50": ["relu", "layer1", "layer2"]}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def vgg_relu_nodes(network: str) -> dict[str, str]:
    """`relu{block}_{i}` -> its node in torchvision's VGG (`features.N`), from torchvision's own layer list (each
    number is a convolution followed by its ReLU, each 'M' a max-pool)."""
    nodes, index, block, conv = {}, 0, 1, 0
    for item in vgg_cfgs[VGG_CONFIGS[network]]:
        if item == "M":
            index, block, conv = index + 1, block + 1, 0
        else:
            conv += 1
            nodes[f"relu{block}_{conv}"] = f"features.{index + 1}"
            index += 2
    return nodes


VGG19_LAYER_NAMES = list(vgg_relu_nodes("vgg19"))


def is_custom(network: str) -> bool:
    return ":" in network


@functools.cache
def layer_names(network: str) -> tuple[str, ...]:
    """The layers a built-in network offers: for VGG the paper's names first; then its node names (eval mode) and
    the modules holding them (a module's name stands for its output, e.g. resnet's `layer1`), coarsest first."""
    with torch.device("meta"):  # the graph only: no memory, no init
        model = get_model(network, weights=None)
    nodes = [n for n in get_graph_node_names(model)[1] if n != "x"]
    modules = {".".join(n.split(".")[:depth]) for n in nodes for depth in range(1, n.count(".") + 1)}
    named = list(vgg_relu_nodes(network)) if network in VGG_CONFIGS else []
    return tuple(named + sorted(set(nodes) | modules, key=lambda n: (n.count("."), nodes.index(n) if n in nodes
                                                                     else min(nodes.index(m) for m in nodes
                                                                              if m.startswith(n + ".")))))


def unknown_layers(network: str, layers: list[str]) -> list[str]:
    """The entries of `layers` that are not layers of the built-in `network`."""
    return [name for name in layers if name not in layer_names(network)]


def check_network(network: str, layers: list[str] | None) -> None:
    """A config's `loss.network` and `loss.layers`, checked before anything is built (a custom network's layers are
    checked when it is built)."""
    if is_custom(network):
        module, _, function = network.partition(":")
        if not module or not function.isidentifier():
            raise UserError(f"loss.network '{network}' is neither one of {', '.join(BUILTIN_NETWORKS)} nor "
                            "package.module:function")
        return
    if network not in BUILTIN_NETWORKS:
        raise UserError(f"loss.network '{network}' is neither one of {', '.join(BUILTIN_NETWORKS)} nor "
                        "package.module:function")
    bad = unknown_layers(network, layers or [])
    if bad:
        shown = ", ".join(layer_names(network)[:24])
        raise UserError(f"loss.layers: '{bad[0]}' is not a layer of {network} (loss.layers=null takes its default "
                        f"layers); its layers: {shown}, ...")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on CUDA (the loss network is frozen, so half precision costs no training stability), fp32 else."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def imagenet_cache_path(network: str) -> Path:
    url = get_model_weights(network).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def load_network(network: str, weights: str = "imagenet", seed: int = 0, head: bool = True) -> tuple[nn.Module, str]:
    """The whole network and a description of its weights: 'imagenet', 'random(seed=N)', 'file:PATH' (built-ins),
    or what a custom network was given. `head=False`: for a feature network that uses none of a VGG's
    classifier; its random weights are then left as constructed, not drawn again (the convolutions are the same)."""
    if is_custom(network):
        return _custom_network(network, weights, seed), weights
    if weights == "random":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = get_model(network, weights=None) if head or network not in VGG_CONFIGS else _headless_vgg(network)
        log.warning("%s loss network has RANDOM weights (seed %d): results are not the paper's", network, seed)
        return model, f"random(seed={seed})"
    if weights == "imagenet":
        try:
            return get_model(network, weights=get_model_weights(network).DEFAULT), "imagenet"
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            path = imagenet_cache_path(network)
            raise UserError(
                f"{network} ImageNet weights are not cached and cannot be downloaded ({one_line(err)}). Place the "
                f"file {path.name} at {path} (fetch it on a machine with internet: `python tools/fetch_vgg19.py "
                f"--network {network} --out {path.name}`, then copy it there), or set "
                f"loss.network_weights=/path/to/{path.name}"
            ) from None
    return _network_from_file(network, Path(weights)), f"file:{weights}"


def _headless_vgg(network: str) -> nn.Module:
    """torchvision's random VGG, whose init draws the convolutions and then the 120M-parameter classifier again:
    the convolutions alone here, drawn as torchvision draws them (test_feature_networks checks it), in 60% of
    the time a rank spends building the network."""
    model = get_model(network, weights=None, init_weights=False)
    for module in model.features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(module.bias, 0)
    return model


def _network_from_file(network: str, path: Path) -> nn.Module:
    """A state-dict file of the whole torchvision network, or (VGG) of its `features` alone."""
    if not path.is_file():
        raise UserError(f"loss.network_weights: '{path}' is neither imagenet, random nor an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or corrupt file
        raise UserError(f"{path}: not a loadable {network} state dict ({one_line(err)})") from None
    model = get_model(network, weights=None)
    features_only = network in VGG_CONFIGS and not any(k.startswith("features.") for k in state)
    if features_only:
        state = {f"features.{k}": v for k, v in state.items()}
    try:
        missing = model.load_state_dict(state, strict=not features_only).missing_keys
    except RuntimeError as err:
        raise UserError(f"{path}: does not match torchvision's {network} ({one_line(err)})") from None
    missing = [k for k in missing if k.startswith("features.")] if features_only else missing
    if missing:
        raise UserError(f"{path}: does not match torchvision's {network} (missing {missing[0]})")
    return model


def _custom_network(spec: str, weights: str, seed: int) -> nn.Module:
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"loss.network '{spec}': cannot import it ({one_line(err)})") from None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = function(weights)
    if not isinstance(model, nn.Module):
        raise UserError(f"loss.network '{spec}': returned a {type(model).__name__}, not a torch.nn.Module")
    return model


class FeatureNetwork(nn.Module):
    """A frozen network truncated after the deepest of `layers`; images in [0, 1] -> {layer: activation}.

    The ImageNet mean and standard deviation are fp32 buffers that move with the module (normalising builds no tensor
    from host data on a step); the network alone runs in `dtype`, so move the module with `.to(device)` only."""

    def __init__(self, network: str, layers: list[str], weights: str = "imagenet", seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.network, self.layers = network, list(layers)
        relu_nodes = vgg_relu_nodes(network) if network in VGG_CONFIGS else {}
        nodes = {relu_nodes.get(name, name): name for name in self.layers}
        head = not all(node.startswith("features.") for node in nodes)  # a VGG layer past the convolutions
        model, self.weights_source = load_network(network, weights, seed, head=head)
        try:
            self.net = create_feature_extractor(model.eval(), return_nodes=nodes)
        except (ValueError, KeyError) as err:  # an unknown node (custom networks are checked only here)
            raise UserError(f"loss.layers {self.layers} for loss.network '{network}': {one_line(err)}") from None
        self.net.requires_grad_(False).eval().to(dtype)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def train(self, mode: bool = True) -> "FeatureNetwork":
        return super().train(False)  # always eval: the loss network is frozen

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(((x.float() - self.mean) / self.std).to(self.dtype))
