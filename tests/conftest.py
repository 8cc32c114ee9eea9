"""Shared fixtures for the core-engine tests: tiny CNNs, calibration batches, helpers.

The suite runs on small shared CPU machines. Intra-op threading is pinned to one thread (override with
``HF_ADAQUANT_TEST_THREADS``): with tiny tensors, several OpenMP threads competing with other processes for a
couple of cores are an order of magnitude slower than one thread.

Tests that take the ``device`` fixture run on CUDA when it is available (else the CPU); ``HF_ADAQUANT_TEST_DEVICE``
(``cpu``, ``cuda``, ``cuda:1``...) overrides the choice.
"""

from __future__ import annotations

import copy
import os
import pytest
import torch
from torch import nn

torch.set_num_threads(int(os.environ.get("HF_ADAQUANT_TEST_THREADS", "1")))

from hf_adaquant import AdaQuantConfig  # noqa: E402


class TinyCNN(nn.Module):
    """conv-BN-ReLU x2, a depthwise conv-BN-ReLU6, a 1x1 conv-BN, global pool, linear head (32x32 inputs)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.relu3 = nn.ReLU6()
        self.pw = nn.Conv2d(16, 16, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.dw(x)))
        x = self.bn4(self.pw(x))
        return self.fc(torch.flatten(self.pool(x), 1))


TINY_CNN_LAYERS = ["conv1", "conv2", "dw", "pw", "fc"]


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (some gammas negative)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                if m.affine:
                    sign = torch.where(torch.rand(n, generator=g) < 0.2, -1.0, 1.0)
                    m.weight.copy_(sign * (torch.rand(n, generator=g) + 0.5))
                    m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


@torch.no_grad()
def fit_batchnorm_stats(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Set every BN's running statistics to the statistics of its input on ``batches`` (like a trained net)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for b in batches:
        model(b)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def make_seeded_cnn(cls: type[nn.Module], seed: int = 0, calibration: list[torch.Tensor] | None = None) -> nn.Module:
    """A ``cls()`` with seeded weights, random BN affine parameters and, given data, BN stats fitted to it."""
    torch.manual_seed(seed)
    model = randomize_batchnorms(cls(), seed=seed + 1)
    if calibration is not None:
        fit_batchnorm_stats(model, calibration)
    return model.eval()


def make_tiny_cnn(seed: int = 0, calibration: list[torch.Tensor] | None = None) -> TinyCNN:
    """A TinyCNN with seeded weights, random BN affine parameters and, given data, BN stats fitted to it."""
    return make_seeded_cnn(TinyCNN, seed, calibration)


def make_batches(num_batches: int = 4, batch_size: int = 16, shape: tuple[int, ...] = (3, 32, 32),
                 seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, *shape, generator=g) for _ in range(num_batches)]


def fast_config(**changes: object) -> AdaQuantConfig:
    """A small-budget config for tiny models (quiet, few iterations)."""
    base = dict(weight_bits=4, activation_bits=4, iterations=30, batch_size=16, bias_tuning_steps=10,
                progress=False, seed=0)
    base.update(changes)
    return AdaQuantConfig(**base)  # type: ignore[arg-type]


def state_dict_clone(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_dict_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


DEVICE_ENV = "HF_ADAQUANT_TEST_DEVICE"


def resolve_test_device(environ: dict[str, str] | None = None) -> torch.device:
    """The device for device-ready tests: ``$HF_ADAQUANT_TEST_DEVICE`` if set, else cuda when available, else cpu.

    Raises:
        ValueError: the variable names no device torch knows, or a CUDA device this machine does not have.
    """
    environ = os.environ if environ is None else environ
    name = environ.get(DEVICE_ENV, "").strip()
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{DEVICE_ENV}={name!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"{DEVICE_ENV}={name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where device-ready tests put their modules and tensors (see :func:`resolve_test_device`)."""
    try:
        return resolve_test_device()
    except ValueError as exc:
        pytest.fail(str(exc), pytrace=False)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, dropout, + shortcut (a 1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.drop = nn.Dropout(0.1)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else nn.Identity())
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.relu2(y + self.downsample(x))


class ResidualCNN(nn.Module):
    """A stem conv, two residual blocks (the second with a downsample conv), a linear head (32x32 inputs)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.block1 = ResidualBlock(8, 8, 1)
        self.block2 = ResidualBlock(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.relu(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# the layers whose output feeds a residual add
RESIDUAL_CNN_RESIDUAL_LAYERS = ["block1.conv2", "block2.conv2", "block2.downsample.0"]


def make_residual_cnn(seed: int = 0, calibration: list[torch.Tensor] | None = None) -> ResidualCNN:
    """A ResidualCNN with seeded weights, random BN affine parameters and, given data, BN stats fitted to it."""
    return make_seeded_cnn(ResidualCNN, seed, calibration)


@pytest.fixture
def calib_batches() -> list[torch.Tensor]:
    """64 calibration samples: 4 batches of 16 random 3x32x32 images."""
    return make_batches()


@pytest.fixture
def padded_tiny_bert() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """(2-layer BertForSequenceClassification, 2 batches of 12 tokens whose first two rows are padded).

    The padding means the attention mask must reach every encoder layer, so block and staged tests see whether
    the mask is replayed next to the hidden states.
    """
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                        vocab_size=60, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for n in (4, 3):
        mask = torch.ones(n, 12, dtype=torch.long)
        mask[0, 7:] = 0
        mask[1, 10:] = 0
        batches.append({"input_ids": torch.randint(5, 60, (n, 12), generator=g), "attention_mask": mask})
    return model, batches


@pytest.fixture
def tiny_cnn(calib_batches: list[torch.Tensor]) -> TinyCNN:
    """TinyCNN whose BN statistics match the calibration data (as a trained network's would)."""
    return make_tiny_cnn(0, calib_batches)


@pytest.fixture(scope="session")
def quantized_tiny_cnn() -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    """(FP model, W4A4 advanced sequential result, batches), shared by tests that only read them."""
    batches = make_batches()
    model = make_tiny_cnn(0, batches)
    from hf_adaquant import quantize

    qmodel = quantize(copy.deepcopy(model), batches, fast_config(iterations=40))
    return model, qmodel, batches
