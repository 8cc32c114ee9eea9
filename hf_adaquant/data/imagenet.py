"""ImageNet-style image folders described by a ``labels.csv`` (``filename,label_index,synset``)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..models.efficientnet_lite import (
    EFFICIENTNET_LITE0_CROP,
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_RESIZE,
    EFFICIENTNET_LITE0_STD,
)

__all__ = [
    "ImageFolderWithLabels",
    "ResizeCenterCropNormalize",
    "efficientnet_lite0_transform",
    "load_imagenet_tensors",
    "read_labels_csv",
]

_logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Tensor]


@dataclass(frozen=True)
class ResizeCenterCropNormalize:
    """Resize the short side, center-crop, scale to [0, 1] and normalise (torchvision semantics).

    Args:
        resize: Target length of the short side.
        crop: Square crop size.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel std divided by after subtracting the mean.
        interpolation: PIL resampling filter used for the resize (bicubic, as timm's
            ``tf_efficientnet_lite0`` config; bilinear costs EfficientNet-Lite0 about 0.8 points).
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Image.Resampling = Image.Resampling.BICUBIC

    def __call__(self, image: Image.Image) -> Tensor:
        """Return a float32 ``(3, crop, crop)`` tensor."""
        image = image.convert("RGB")
        w, h = image.size
        if w <= h:
            new_w, new_h = self.resize, int(self.resize * h / w)
        else:
            new_w, new_h = int(self.resize * w / h), self.resize
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), self.interpolation)
        left = int(round((new_w - self.crop) / 2.0))
        top = int(round((new_h - self.crop) / 2.0))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        x = x.div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()


def efficientnet_lite0_transform() -> ResizeCenterCropNormalize:
    """Preprocessing for EfficientNet-Lite0: bicubic resize of the short side to 256, center crop 224,
    ``(x/255 - 0.5) / 0.5`` (gives the reference 83.31% top-1 on the shared ``val1300`` set)."""
    return ResizeCenterCropNormalize(
        resize=EFFICIENTNET_LITE0_RESIZE,
        crop=EFFICIENTNET_LITE0_CROP,
        mean=EFFICIENTNET_LITE0_MEAN,
        std=EFFICIENTNET_LITE0_STD,
    )


def read_labels_csv(folder: str | Path) -> list[tuple[str, int, str]]:
    """Read ``folder/labels.csv`` as ``(filename, label_index, synset)`` rows sorted by file name.

    Raises:
        FileNotFoundError: If the folder has no ``labels.csv``.
    """
    path = Path(folder) / "labels.csv"
    with path.open(newline="") as fh:
        rows = [(r["filename"], int(r["label_index"]), r.get("synset", "")) for r in csv.DictReader(fh)]
    return sorted(rows, key=lambda r: r[0])


class ImageFolderWithLabels(Dataset):
    """A folder of images plus ``labels.csv``, in file-name order.

    Args:
        folder: Folder with the images and ``labels.csv`` (columns ``filename,label_index,synset``).
        transform: Turns a PIL image into a tensor; defaults to the EfficientNet-Lite0 preprocessing.
        limit: Keep only the first ``limit`` images (after sorting by file name).

    Example:
        >>> ds = ImageFolderWithLabels("demo_data/imagenet/val")
        >>> x, y = ds[0]
    """

    def __init__(
        self,
        folder: str | Path,
        transform: Transform | None = None,
        limit: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.transform: Transform = transform if transform is not None else efficientnet_lite0_transform()
        rows = read_labels_csv(self.folder)
        if limit is not None:
            rows = rows[:limit]
        self.filenames = [r[0] for r in rows]
        self.labels = [r[1] for r in rows]
        self.synsets = [r[2] for r in rows]

    def __len__(self) -> int:
        return len(self.filenames)

    def load_image(self, index: int) -> Image.Image:
        """Open image ``index`` as a PIL image (decoded, not transformed)."""
        with Image.open(self.folder / self.filenames[index]) as im:
            im.load()
            return im.copy() if im.mode == "RGB" else im.convert("RGB")

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.load_image(index)), self.labels[index]


def load_imagenet_tensors(
    folder: str | Path,
    limit: int | None = None,
    transform: Transform | None = None,
    num_workers: int = 2,
) -> tuple[Tensor, Tensor]:
    """Decode a labelled image folder into one float tensor.

    Decoding runs on a small thread pool; the order is always file-name order, so the result is
    deterministic.

    Args:
        folder: Folder with images and ``labels.csv``.
        limit: Keep only the first ``limit`` images (after sorting by file name).
        transform: PIL image -> tensor; defaults to the EfficientNet-Lite0 preprocessing.
        num_workers: Decoding threads (1 means a plain loop).

    Returns:
        ``(x, y)``: float32 ``(N, 3, H, W)`` and int64 ``(N,)``.

    Example:
        >>> x, y = load_imagenet_tensors("demo_data/imagenet/calib", limit=64)
    """
    ds = ImageFolderWithLabels(folder, transform=transform, limit=limit)
    if len(ds) == 0:
        raise ValueError(f"no images listed in {ds.folder / 'labels.csv'}")
    if num_workers <= 1:
        images = [ds[i][0] for i in range(len(ds))]
    else:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            images = [item[0] for item in pool.map(ds.__getitem__, range(len(ds)))]
    _logger.debug("decoded %d images from %s", len(images), ds.folder)
    return torch.stack(images), torch.tensor(ds.labels, dtype=torch.long)
