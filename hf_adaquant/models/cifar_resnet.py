"""CIFAR-10 ResNets (option-A shortcut) compatible with the akamaster checkpoints.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (CIFAR variant, depth = 6n + 2).
Weights: akamaster/pytorch_resnet_cifar10 (BSD-2-Clause, (c) 2018 Yerlan Idelbayev).

Every ReLU is its own ``nn.ReLU`` module and the forward is ``torch.fx``-traceable, so graph analysis
(BN folding, activation-quantizer placement) can see the whole network.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "BasicBlock",
    "CifarResNet",
    "ShortcutA",
    "cifar_resnet20",
    "cifar_resnet56",
    "load_cifar_resnet",
]

_logger = logging.getLogger(__name__)

CIFAR_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel input mean (pixels scaled to [0, 1]) used to train the akamaster checkpoints."""
CIFAR_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel input std used to train the akamaster checkpoints."""


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: subsample by 2 and zero-pad channels.

    Args:
        planes: Number of output channels of the block; ``planes // 4`` zero channels are added on
            each side of the input's channels.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        """Subsample spatially by 2 and zero-pad the channel dimension."""
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), mode="constant", value=0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection and a ReLU after the add.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = (
            ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        """Run the block."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, three stages of ``BasicBlock`` (16/32/64 channels), GAP, linear head.

    Args:
        num_blocks: Blocks per stage, e.g. ``(3, 3, 3)`` for ResNet-20.
        num_classes: Output classes.
    """

    def __init__(self, num_blocks: tuple[int, int, int] | list[int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits for a normalised ``(N, 3, 32, 32)`` batch."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


def cifar_resnet20(num_classes: int = 10) -> CifarResNet:
    """Build ResNet-20 (n = 3, 0.27M parameters) with random weights."""
    return CifarResNet((3, 3, 3), num_classes)


def cifar_resnet56(num_classes: int = 10) -> CifarResNet:
    """Build ResNet-56 (n = 9, 0.85M parameters) with random weights."""
    return CifarResNet((9, 9, 9), num_classes)


_BUILDERS = {20: cifar_resnet20, 56: cifar_resnet56}


def load_cifar_resnet(depth: int, checkpoint: str | Path) -> CifarResNet:
    """Build a CIFAR ResNet and load an akamaster ``.th`` checkpoint into it.

    Args:
        depth: 20 or 56.
        checkpoint: Path to the ``.th`` file (a dict with ``state_dict`` saved from ``nn.DataParallel``).

    Returns:
        The model in eval mode.

    Raises:
        ValueError: On an unsupported depth or unexpected/missing keys.

    Example:
        >>> model = load_cifar_resnet(20, "../shared/models/cifar10-resnet/resnet20-12fca82f.th")
    """
    if depth not in _BUILDERS:
        raise ValueError(f"depth must be one of {sorted(_BUILDERS)}, got {depth}")
    model = _BUILDERS[depth]()
    # The file holds a python float / numpy scalar besides tensors, hence weights_only=False.
    # Only load checkpoints you trust.
    ckpt = torch.load(Path(checkpoint), map_location="cpu", weights_only=False)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    state = OrderedDict(
        (k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items()
    )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {checkpoint} does not match ResNet-{depth}: "
            f"missing={missing}, unexpected={list(result.unexpected_keys)}"
        )
    best = ckpt.get("best_prec1") if isinstance(ckpt, dict) else None
    _logger.debug("loaded ResNet-%d from %s (best_prec1=%s)", depth, checkpoint, best)
    return model.eval()
