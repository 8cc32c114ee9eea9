"""AdaQuantQuantizer: model resolution (objects, dirs, Hub ids), calibration datasets, quantize + save, push."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

import hf_adaquant.quantizer as quantizer_module
from tests.conftest import make_batches, make_tiny_cnn
from hf_adaquant import AdaQuantConfig, AdaQuantQuantizer, load_quantized
from hf_adaquant.nn import QModuleMixin

LIGHT = dict(weight_bits=4, activation_bits=8, pipeline="light", progress=False, seed=0)
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50,
            max_position_embeddings=32)


@pytest.fixture(scope="module")
def timm_model():
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False).eval()


def test_from_pretrained_model_objects(timm_model) -> None:
    assert AdaQuantQuantizer.from_pretrained(BertForQuestionAnswering(BertConfig(**TINY))).kind == "transformers"
    assert AdaQuantQuantizer.from_pretrained(timm_model).kind == "timm"
    assert AdaQuantQuantizer.from_pretrained(make_tiny_cnn()).kind == "torch"
    with pytest.raises(TypeError, match="nn.Module"):
        AdaQuantQuantizer(object())  # type: ignore[arg-type]


def test_from_pretrained_local_dirs(tmp_path: Path, timm_model) -> None:
    from timm.models import save_for_hf

    BertForQuestionAnswering(BertConfig(**TINY)).save_pretrained(tmp_path / "bert")
    q = AdaQuantQuantizer.from_pretrained(tmp_path / "bert")
    assert type(q.model).__name__ == "BertForQuestionAnswering" and q.model.dtype == torch.float32
    save_for_hf(timm_model, str(tmp_path / "timm"), safe_serialization=True)
    q = AdaQuantQuantizer.from_pretrained(tmp_path / "timm")
    assert q.kind == "timm"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(q.model(x), timm_model(x))  # pretrained weights came from the directory
    with pytest.raises(ValueError, match="missing"):
        AdaQuantQuantizer.from_pretrained(tmp_path)


def test_hub_ids_route_to_timm_or_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    calls: list[tuple] = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: calls.append(("timm", name, kw)) or make_tiny_cnn())
    monkeypatch.setattr(quantizer_module, "_load_transformers",
                        lambda name, task, **kw: calls.append(("hf", name, task)) or make_tiny_cnn())
    AdaQuantQuantizer.from_pretrained("timm/resnet50.a1_in1k")
    AdaQuantQuantizer.from_pretrained("csarron/bert-base-uncased-squad-v1", task="question-answering")
    assert calls == [("timm", "hf-hub:timm/resnet50.a1_in1k", {"pretrained": True}),
                     ("hf", "csarron/bert-base-uncased-squad-v1", "question-answering")]


def test_unknown_task_is_refused(tmp_path: Path) -> None:
    BertForQuestionAnswering(BertConfig(**TINY)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        AdaQuantQuantizer.from_pretrained(tmp_path / "bert", task="qa")


def test_calibration_dataset_from_json_list_and_imagefolder(tmp_path: Path, timm_model) -> None:
    from PIL import Image

    quantizer = AdaQuantQuantizer(make_tiny_cnn())
    rows = [{"text": f"sample {i}", "label": i} for i in range(20)]
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = quantizer.get_calibration_dataset(str(tmp_path / "calib.jsonl"), num_samples=8, seed=1)
    again = quantizer.get_calibration_dataset(str(tmp_path / "calib.jsonl"), num_samples=8, seed=1)
    assert len(ds) == 8 and ds["label"] == again["label"] and len(set(ds["label"])) == 8
    texts = quantizer.get_calibration_dataset(["a", "b", "c"], num_samples=10)
    assert sorted(texts["text"]) == ["a", "b", "c"]

    folder = tmp_path / "images" / "cls0"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        array = torch.randint(0, 255, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"{i}.png")

    def to_tensor(batch):
        return {"pixel_values": [torch.from_numpy(__import__("numpy").asarray(im.convert("RGB").resize((32, 32)),
                                                                           dtype="float32")).permute(2, 0, 1) / 255
                                 for im in batch["image"]]}

    images = quantizer.get_calibration_dataset(str(tmp_path / "images"), num_samples=4, preprocess_function=to_tensor)
    assert images.column_names == ["pixel_values"] and len(images) == 4
    qmodel = AdaQuantQuantizer(timm_model).quantize(AdaQuantConfig(**LIGHT), images, batch_size=2)
    assert any(isinstance(m, QModuleMixin) for m in qmodel.modules())


def test_quantize_saves_under_either_name(tmp_path: Path) -> None:
    batches = make_batches(2, 8)
    quantizer = AdaQuantQuantizer(make_tiny_cnn(0, batches))
    qmodel = quantizer.quantize(AdaQuantConfig(**LIGHT), batches, save_directory=tmp_path / "a")
    assert quantizer.save_dir == tmp_path / "a" and quantizer.qmodel is qmodel
    with torch.no_grad():
        assert torch.allclose(load_quantized(tmp_path / "a", model=make_tiny_cnn())(batches[0]), qmodel(batches[0]),
                              atol=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        quantizer.quantize(AdaQuantConfig(**LIGHT), batches, save_dir=tmp_path / "b", save_directory=tmp_path / "c")
    with pytest.raises(TypeError, match="AdaQuantConfig"):
        quantizer.quantize({"weight_bits": 4}, batches)  # type: ignore[arg-type]


def test_transformers_quantize_copies_tokenizer_and_marks_model(tmp_path: Path) -> None:
    from transformers import AutoModelForQuestionAnswering, BertTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ab", "cd"]))
    BertForQuestionAnswering(BertConfig(**TINY)).save_pretrained(tmp_path / "fp")
    BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "fp")
    quantizer = AdaQuantQuantizer.from_pretrained(tmp_path / "fp")
    batch = {"input_ids": torch.randint(5, 50, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    qmodel = quantizer.quantize(AdaQuantConfig(**LIGHT), [batch], save_dir=tmp_path / "q")
    layout = qmodel.config.quantization_config.checkpoint_layout
    # the default embedding_bits=8 quantizes BERT's tables, which needs layout version 2
    assert layout["version"] == 2 and set(layout["embeddings"]) >= {"bert.embeddings.word_embeddings"}
    assert (tmp_path / "q" / "tokenizer_config.json").exists()
    reloaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert (reloaded(**batch).start_logits - qmodel(**batch).start_logits).abs().max() <= 1e-6


def test_push_to_hub_delegates_to_hub_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fake = types.ModuleType("hf_adaquant.hub")
    fake.push_to_hub = lambda save_dir, repo_id, **kw: calls.append((save_dir, repo_id, kw)) or "url"
    monkeypatch.setitem(sys.modules, "hf_adaquant.hub", fake)
    batches = make_batches(1, 8)
    quantizer = AdaQuantQuantizer(make_tiny_cnn(0, batches))
    with pytest.raises(RuntimeError, match="nothing to push"):
        quantizer.push_to_hub("me/x")
    quantizer.quantize(AdaQuantConfig(**LIGHT), batches, save_dir=tmp_path / "q")
    assert quantizer.push_to_hub("me/x", private=True) == "url"
    assert calls == [(tmp_path / "q", "me/x", {"private": True})]


# --------------------------------------------------------------------------------------- optimum conventions
def test_is_an_optimum_quantizer() -> None:
    from optimum.quantization_base import OptimumQuantizer

    assert issubclass(AdaQuantQuantizer, OptimumQuantizer)
    assert isinstance(AdaQuantQuantizer(make_tiny_cnn()), OptimumQuantizer)


def test_get_calibration_dataset_has_ort_ov_signature() -> None:
    import inspect

    params = inspect.signature(AdaQuantQuantizer.get_calibration_dataset).parameters
    expected = {"dataset_name": inspect.Parameter.empty, "num_samples": 100, "dataset_config_name": None,
                "dataset_split": "train", "preprocess_function": None, "preprocess_batch": True, "seed": 2016,
                "token": None}
    assert list(params)[1:9] == list(expected)
    assert {name: params[name].default for name in expected} == expected


def test_calibration_dataset_old_argument_names_warn_and_work(tmp_path: Path) -> None:
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t0", "t1", "t2"]}),
                               "validation": datasets.Dataset.from_dict({"text": ["v0", "v1", "v2", "v3"]})})
    quantizer = AdaQuantQuantizer(make_tiny_cnn())
    new = quantizer.get_calibration_dataset(ds, num_samples=10, dataset_split="validation")
    with pytest.warns(FutureWarning, match="'split' is deprecated.*'dataset_split'"):
        old = quantizer.get_calibration_dataset(ds, num_samples=10, split="validation")
    assert sorted(old["text"]) == sorted(new["text"]) == ["v0", "v1", "v2", "v3"]
    assert old["text"] == new["text"]  # same default seed, same order
    with pytest.warns(FutureWarning, match="dataset_name_or_path_or_list"):
        by_old_name = quantizer.get_calibration_dataset(dataset_name_or_path_or_list=["a", "b"], num_samples=5)
    assert sorted(by_old_name["text"]) == ["a", "b"]
    with pytest.raises(TypeError, match="both 'split'"):
        quantizer.get_calibration_dataset(ds, split="train", dataset_split="validation")


def test_calibration_dataset_seed_and_token_reach_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    seen: dict = {}

    def fake_load_dataset(name, config=None, **kwargs):
        seen.update(name=name, config=config, **kwargs)
        return datasets.Dataset.from_dict({"text": [f"r{i}" for i in range(50)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    quantizer = AdaQuantQuantizer(make_tiny_cnn())
    ds = quantizer.get_calibration_dataset("someone/texts", num_samples=5, dataset_config_name="en",
                                           dataset_split="validation", token="hf_x")
    assert seen == {"name": "someone/texts", "config": "en", "split": "validation", "token": "hf_x"}
    expected = datasets.Dataset.from_dict({"text": [f"r{i}" for i in range(50)]}).shuffle(seed=2016)["text"][:5]
    assert ds["text"] == expected  # optimum's default seed 2016


def test_image_processor_is_copied_next_to_the_checkpoint(tmp_path: Path) -> None:
    import transformers

    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "fp")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "fp")
    quantizer = AdaQuantQuantizer.from_pretrained(tmp_path / "fp")
    quantizer.quantize(AdaQuantConfig(**LIGHT), [{"pixel_values": torch.randn(4, 3, 32, 32)}], save_dir=tmp_path / "q")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "q")
    assert processor.size == {"height": 32, "width": 32}
    assert not (tmp_path / "q" / "tokenizer_config.json").exists()  # the model has no tokenizer
