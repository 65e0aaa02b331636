"""What every ImageNet-trained torchvision network we run expects (the VGG19 loss network, the VGG-FC
baseline, Inception v3 for FID), and the VGG19 layer sets of the paper's loss."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's two feature perceptual losses, named as in its tables; config.VGG_LAYER_NAMES lists every layer.
PAPER_LAYERS = {"123": ("relu1_2", "relu2_1", "relu3_1"), "345": ("relu3_1", "relu4_1", "relu5_1")}


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (N x 3 x H x W, any float dtype) standardised with ImageNet's channel statistics."""
    return TF.normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD))
