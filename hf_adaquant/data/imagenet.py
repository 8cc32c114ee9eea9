"""ImageNet-style image folders described by a ``labels.csv`` (``filename,label_index,synset``)."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm.data
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

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


def _crop_pct(crop: int, resize: int) -> float:
    """The ``crop_pct`` for which timm resizes the short side to exactly ``resize`` (it takes
    ``floor(crop / crop_pct)``; ``crop / resize`` itself falls one pixel short for some pairs, e.g. 9 / 14)."""
    pct = crop / resize
    while math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    while math.floor(crop / pct) > resize:
        pct = math.nextafter(pct, math.inf)
    return pct


@dataclass(frozen=True)
class ResizeCenterCropNormalize:
    """Resize the short side, center-crop, scale to [0, 1] and normalise: ``timm.data.create_transform``'s
    evaluation transform (torchvision ``Resize`` / ``CenterCrop`` / ``ToTensor`` / ``Normalize``).

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
    _transform: Callable[[Image.Image], Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        transform = timm.data.create_transform(
            input_size=(3, self.crop, self.crop), is_training=False, interpolation=self.interpolation.name.lower(),
            mean=tuple(self.mean), std=tuple(self.std), crop_pct=_crop_pct(self.crop, self.resize),
            crop_mode="center")
        object.__setattr__(self, "_transform", transform)  # frozen dataclass: set once, here

    def __call__(self, image: Image.Image) -> Tensor:
        """Return a float32 ``(3, crop, crop)`` tensor."""
        return self._transform(image.convert("RGB")).contiguous()


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
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Decode a labelled image folder into one float tensor.

    Decoding runs in ``torch.utils.data.DataLoader`` worker processes; the order is always file-name order, so
    the result is deterministic.

    Args:
        folder: Folder with images and ``labels.csv``.
        limit: Keep only the first ``limit`` images (after sorting by file name).
        transform: PIL image -> tensor; defaults to the EfficientNet-Lite0 preprocessing.
        num_workers: DataLoader worker processes (0 or 1: decode in this process).
        batch_size: Images per DataLoader batch.

    Returns:
        ``(x, y)``: float32 ``(N, 3, H, W)`` and int64 ``(N,)``.

    Example:
        >>> x, y = load_imagenet_tensors("demo_data/imagenet/calib", limit=64)
    """
    ds = ImageFolderWithLabels(folder, transform=transform, limit=limit)
    if len(ds) == 0:
        raise ValueError(f"no images listed in {ds.folder / 'labels.csv'}")
    # One worker process is slower than decoding here (it only adds the transfer).
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers if num_workers > 1 else 0)
    x: Tensor | None = None
    start = 0
    for xb, _ in loader:
        if x is None:  # filled in place: no second full-size copy as torch.cat would make
            x = torch.empty((len(ds), *xb.shape[1:]), dtype=xb.dtype)
        x[start:start + len(xb)] = xb
        start += len(xb)
    assert x is not None and start == len(ds)
    _logger.debug("decoded %d images from %s", len(ds), ds.folder)
    return x, torch.tensor(ds.labels, dtype=torch.long)
