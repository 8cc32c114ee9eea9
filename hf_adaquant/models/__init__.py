"""Reference models used by the examples, tests and benchmarks."""

from .cifar_resnet import CIFAR_MEAN as CIFAR_MEAN
from .cifar_resnet import CIFAR_STD as CIFAR_STD
from .cifar_resnet import CifarResNet as CifarResNet
from .cifar_resnet import cifar_resnet20 as cifar_resnet20
from .cifar_resnet import cifar_resnet56 as cifar_resnet56
from .cifar_resnet import load_cifar_resnet as load_cifar_resnet
from .efficientnet_lite import EFFICIENTNET_LITE0_CROP as EFFICIENTNET_LITE0_CROP
from .efficientnet_lite import EFFICIENTNET_LITE0_MEAN as EFFICIENTNET_LITE0_MEAN
from .efficientnet_lite import EFFICIENTNET_LITE0_RESIZE as EFFICIENTNET_LITE0_RESIZE
from .efficientnet_lite import EFFICIENTNET_LITE0_STD as EFFICIENTNET_LITE0_STD
from .efficientnet_lite import load_efficientnet_lite0 as load_efficientnet_lite0

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CifarResNet",
    "EFFICIENTNET_LITE0_CROP",
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_RESIZE",
    "EFFICIENTNET_LITE0_STD",
    "cifar_resnet20",
    "cifar_resnet56",
    "load_cifar_resnet",
    "load_efficientnet_lite0",
]
