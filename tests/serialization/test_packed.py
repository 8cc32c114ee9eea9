"""freeze / load_quantized(packed=True): packed integer weights in memory, outputs bitwise those of the model."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from tests.conftest import make_batches, make_tiny_cnn
from timm.layers import Conv2dSame
from torch import nn

from hf_adaquant import AdaQuantConfig, freeze, load_quantized, quantize, save_quantized
from hf_adaquant.export import is_frozen
from hf_adaquant.integrations.timm import QConv2dSame
from hf_adaquant.nn import QConv2d, QLinear, QModuleMixin
from hf_adaquant.serialization.packed import FrozenQConv2d, FrozenQConv2dSame, FrozenQLinear


def light(weight_bits: int, activation_bits: int | None = 8) -> AdaQuantConfig:
    return AdaQuantConfig(weight_bits=weight_bits, activation_bits=activation_bits, pipeline="light",
                          first_last_bits=None, progress=False, seed=0)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.nbytes for t in tensors.values())


class Wide(nn.Module):
    """Layers large enough that weights, not per-channel steps and biases, dominate: a TF-padded conv (timm's
    Conv2dSame), a depthwise conv, two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 64, 3, stride=2)
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.conv(torch.relu(self.stem(x))))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


@pytest.fixture(scope="module")
def wide_batches() -> list[torch.Tensor]:
    return make_batches(2, 8, shape=(3, 16, 16))


@pytest.mark.parametrize("weight_bits,activation_bits", [(8, 8), (4, 4), (3, None), (2, 4)])
def test_frozen_model_is_bitwise_equal(wide_batches, weight_bits: int, activation_bits: int | None) -> None:
    torch.manual_seed(0)
    qmodel = quantize(Wide().eval(), wide_batches, light(weight_bits, activation_bits))
    assert isinstance(qmodel.stem, QConv2dSame)
    frozen = freeze(copy.deepcopy(qmodel))
    assert type(frozen.stem) is FrozenQConv2dSame and type(frozen.conv) is FrozenQConv2d
    assert type(frozen.fc2) is FrozenQLinear and all(is_frozen(m) for m in frozen.modules()
                                                     if isinstance(m, QModuleMixin))
    x = make_batches(1, 5, shape=(3, 16, 16), seed=3)[0]
    with torch.no_grad():
        assert torch.equal(frozen(x), qmodel(x))
        for name in ("stem", "conv", "dw", "fc1", "fc2"):  # the rebuilt weight is the fake-quantized one
            assert torch.equal(frozen.get_submodule(name).weight, qmodel.get_submodule(name).quantized_weight())
    assert "weight" not in dict(frozen.fc1.named_parameters())
    assert frozen.fc1.weight_packed.dtype == torch.uint8


def test_resident_weight_memory_at_w4_is_below_a_fifth_of_fp32(wide_batches) -> None:
    torch.manual_seed(0)
    model = Wide().eval()
    qmodel = quantize(copy.deepcopy(model), wide_batches, light(4))
    frozen = freeze(copy.deepcopy(qmodel))
    fp32, fake, packed = resident_bytes(model), resident_bytes(qmodel), resident_bytes(frozen)
    assert fake >= fp32  # fake quantization holds a float weight per layer
    assert packed <= 0.2 * fp32, (packed, fp32)
    weight_fp32 = sum(m.weight.nbytes for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    packed_codes = sum(m.weight_packed.nbytes for m in frozen.modules() if is_frozen(m))
    assert packed_codes * 8 == pytest.approx(weight_fp32, rel=0.01)  # two codes per byte vs four bytes each


def test_freeze_is_idempotent_and_keeps_the_model_usable(quantized_tiny_cnn, tmp_path: Path) -> None:
    _, qmodel, batches = quantized_tiny_cnn
    frozen = freeze(copy.deepcopy(qmodel))
    assert freeze(frozen) is frozen
    x = batches[0]
    with torch.no_grad():
        expected = qmodel(x)
        assert torch.equal(frozen(x), expected)
    # pickled whole, moved, and through state_dict
    buffer = io.BytesIO()
    torch.save(frozen, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False).to("cpu")
    twin = freeze(copy.deepcopy(qmodel))
    twin.load_state_dict(frozen.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), expected) and torch.equal(twin(x), expected)
    assert any(k.endswith("weight_packed") for k in frozen.state_dict())
    assert not any(k.endswith(".weight") for k in frozen.state_dict())
    # a frozen model saves to the same compact checkpoint and loads back
    save_quantized(frozen, tmp_path / "frozen")
    reloaded = load_quantized(tmp_path / "frozen", model=make_tiny_cnn(0))
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)


def test_load_quantized_packed(quantized_tiny_cnn, tmp_path: Path) -> None:
    _, qmodel, batches = quantized_tiny_cnn
    save_quantized(qmodel, tmp_path / "ckpt")
    packed = load_quantized(tmp_path / "ckpt", model=make_tiny_cnn(0), packed=True)
    plain = load_quantized(tmp_path / "ckpt", model=make_tiny_cnn(0))
    assert all(is_frozen(m) for m in packed.modules() if isinstance(m, QModuleMixin))
    assert not any(is_frozen(m) for m in plain.modules())
    assert not packed.training and resident_bytes(packed) < resident_bytes(plain)
    with torch.no_grad():
        assert torch.equal(packed(batches[1]), qmodel(batches[1]))


def test_transformers_checkpoint_loads_packed(tmp_path: Path) -> None:
    from tests.integrations.test_transformers import TINY, _batches
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    qmodel = quantize(BertForQuestionAnswering(BertConfig(**TINY)).eval(), _batches(), light(4))
    save_quantized(qmodel, tmp_path / "bert")
    packed = load_quantized(tmp_path / "bert", packed=True)
    assert isinstance(packed.qa_outputs, FrozenQLinear)
    batch = _batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(packed(**batch).start_logits, qmodel(**batch).start_logits)


class QFancyConv(QConv2d):
    """A quantized layer kind freeze does not know."""


def test_bad_input(quantized_tiny_cnn) -> None:
    with pytest.raises(ValueError, match="no layer quantized by hf_adaquant"):
        freeze(make_tiny_cnn(0))
    _, qmodel, _ = quantized_tiny_cnn
    fancy = copy.deepcopy(qmodel)
    fancy.conv2.__class__ = QFancyConv
    with pytest.raises(ValueError, match="layer 'conv2' is a QFancyConv, which freeze does not know"):
        freeze(fancy)
    uncalibrated = nn.Sequential(QLinear.from_float(nn.Linear(4, 4), 4, None))
    with pytest.raises(ValueError, match="layer '0': .*uncalibrated"):
        freeze(uncalibrated)
