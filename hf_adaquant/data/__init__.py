"""Data loaders for the reference models: CIFAR-10 ``.npz`` arrays and labelled ImageNet folders."""

from .cifar import load_cifar10_npz as load_cifar10_npz
from .cifar import normalize_cifar as normalize_cifar
from .imagenet import ImageFolderWithLabels as ImageFolderWithLabels
from .imagenet import ResizeCenterCropNormalize as ResizeCenterCropNormalize
from .imagenet import efficientnet_lite0_transform as efficientnet_lite0_transform
from .imagenet import load_imagenet_tensors as load_imagenet_tensors
from .imagenet import read_labels_csv as read_labels_csv
from .paths import repo_root as repo_root
from .paths import shared_dir as shared_dir

__all__ = [
    "ImageFolderWithLabels",
    "ResizeCenterCropNormalize",
    "efficientnet_lite0_transform",
    "load_cifar10_npz",
    "load_imagenet_tensors",
    "normalize_cifar",
    "read_labels_csv",
    "repo_root",
    "shared_dir",
]
