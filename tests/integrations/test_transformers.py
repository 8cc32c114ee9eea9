"""transformers path: "adaquant" registration, from_pretrained round trips, loud failure without the library,
save_pretrained, corrupted checkpoints, and quantize-on-load equal to AdaQuantQuantizer."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification, BertConfig,
                          BertForQuestionAnswering, BertForSequenceClassification, BertTokenizer)
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoQuantizationConfig

import hf_adaquant
from hf_adaquant import AdaQuantConfig, AdaQuantQuantizer, quantize, save_quantized
from hf_adaquant.integrations.transformers import AdaQuantHfQuantizer, register
from hf_adaquant.nn import QLinear, QModuleMixin
from hf_adaquant.serialization import WEIGHTS_NAME, CheckpointError

WORDS = ["".join(p) for p in itertools.product("abcdefghij", repeat=2)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=len(VOCAB), max_position_embeddings=64)
LIGHT = dict(weight_bits=4, activation_bits=8, pipeline="light", progress=False, seed=0)


def _texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(l),), generator=g))
            for l in torch.randint(4, 14, (n,), generator=g)]


def _batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(8, 16, dtype=torch.long)
    mask[:, 12:] = 0
    return [{"input_ids": torch.randint(5, len(VOCAB), (8, 16), generator=g), "attention_mask": mask}
            for _ in range(n)]


def _diff(a, b, batch) -> float:
    with torch.no_grad():
        oa, ob = a(**batch), b(**batch)
    keys = [k for k in ("start_logits", "end_logits", "logits") if getattr(oa, k, None) is not None]
    return max(float((getattr(oa, k) - getattr(ob, k)).abs().max()) for k in keys)


@pytest.fixture(scope="module")
def bert_qa(tmp_path_factory: pytest.TempPathFactory):
    """(float model, quantized model, checkpoint dir, float dir with tokenizer)."""
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(**TINY)).eval()
    root = tmp_path_factory.mktemp("bert")
    model.save_pretrained(root / "fp")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(vocab_file=str(root / "vocab.txt")).save_pretrained(root / "fp")
    qmodel = quantize(model, _batches(), AdaQuantConfig(**LIGHT))
    save_quantized(qmodel, root / "q")
    return model, qmodel, root / "q", root / "fp"


# ------------------------------------------------------------------------------------------------ registration
def test_config_is_the_registered_quantization_config() -> None:
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["adaquant"] is AdaQuantConfig
    assert AUTO_QUANTIZER_MAPPING["adaquant"] is AdaQuantHfQuantizer
    register()  # importing twice / reloading must not raise
    import importlib

    importlib.reload(hf_adaquant.integrations.transformers)
    assert AUTO_QUANTIZER_MAPPING["adaquant"].__name__ == "AdaQuantHfQuantizer"
    register()


def test_config_json_round_trip_with_quant_method() -> None:
    config = AdaQuantConfig(weight_bits=3, layer_bits={"a": (8, None)}, dataset=["in memory"], tokenizer=object())
    data = json.loads(config.to_json_string(use_diff=False))
    assert data["quant_method"] == "adaquant" and data["dataset"] is None and data["tokenizer"] is None
    again = AutoQuantizationConfig.from_dict(data)
    assert isinstance(again, AdaQuantConfig) and again.layer_bits == {"a": (8, None)} and again.weight_bits == 3
    config2, unused = AdaQuantConfig.from_dict(data, return_unused_kwargs=True, weight_bits=5, other=1)
    assert config2.weight_bits == 5 and unused == {"other": 1}
    with pytest.raises(ValueError, match="quant_method must be 'adaquant'"):
        AdaQuantConfig(quant_method="gptq")


# ------------------------------------------------------------------------------------------------ round trips
def test_auto_model_round_trip_question_answering(bert_qa) -> None:
    _, qmodel, directory, _ = bert_qa
    assert sorted(p.name for p in directory.iterdir()) == ["adaquant_model.safetensors", "config.json"]
    config = json.loads((directory / "config.json").read_text())
    assert "transformers_weights" not in config
    assert config["quantization_config"]["checkpoint_layout"]["layers"]["qa_outputs"]["weight_bits"] == 8
    loaded = AutoModelForQuestionAnswering.from_pretrained(directory)
    assert isinstance(loaded.bert.encoder.layer[0].attention.self.query, QLinear)
    assert isinstance(loaded.config.quantization_config, AdaQuantConfig)
    for batch in _batches(2, seed=7):
        assert _diff(loaded, qmodel, batch) <= 1e-6
    assert _diff(hf_adaquant.load_quantized(directory), qmodel, _batches(1, seed=8)[0]) <= 1e-6


def test_auto_model_round_trip_sequence_classification(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = BertForSequenceClassification(BertConfig(num_labels=3, **TINY)).eval()
    qmodel = quantize(model, _batches(), AdaQuantConfig(**LIGHT))
    save_quantized(qmodel, tmp_path / "q")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "q")
    assert _diff(loaded, qmodel, _batches(1, seed=3)[0]) <= 1e-6


def test_save_pretrained_of_loaded_model_writes_compact_format(bert_qa, tmp_path: Path) -> None:
    _, qmodel, directory, _ = bert_qa
    loaded = AutoModelForQuestionAnswering.from_pretrained(directory)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / WEIGHTS_NAME).exists() and not (tmp_path / "again" / "model.safetensors").exists()
    again = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "again")
    assert _diff(again, qmodel, _batches(1, seed=4)[0]) <= 1e-6


def test_loading_without_hf_adaquant_fails_loudly(bert_qa) -> None:
    _, _, directory, _ = bert_qa
    code = ("import sys, transformers\n"
            "from transformers import AutoModelForQuestionAnswering\n"
            f"m = AutoModelForQuestionAnswering.from_pretrained({str(directory)!r})\n"
            "print('LOADED', 'hf_adaquant' in sys.modules)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0, result.stdout
    assert "LOADED" not in result.stdout
    assert "Unknown quantization type, got adaquant" in result.stderr
    assert "no file named model.safetensors" in result.stderr


def test_corrupted_checkpoint_through_from_pretrained(bert_qa, tmp_path: Path) -> None:
    import shutil

    _, _, directory, _ = bert_qa
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    data = (broken / WEIGHTS_NAME).read_bytes()
    (broken / WEIGHTS_NAME).write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=f"{broken / WEIGHTS_NAME}.*corrupted or truncated"):
        AutoModelForQuestionAnswering.from_pretrained(broken)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["checkpoint_layout"]["version"] = 99
    shutil.copy(directory / WEIGHTS_NAME, broken / WEIGHTS_NAME)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layout version 99 is not supported"):
        AutoModelForQuestionAnswering.from_pretrained(broken)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_checkpoint_through_from_pretrained_names_the_file(bert_qa, tmp_path: Path, keep: float,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    _, _, directory, _ = bert_qa
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    data = (broken / WEIGHTS_NAME).read_bytes()
    (broken / WEIGHTS_NAME).write_bytes(data[: int(len(data) * keep)])  # transformers opens it for its dtype first
    with pytest.raises(CheckpointError, match=f"{broken / WEIGHTS_NAME}: corrupted or truncated"):
        AutoModelForQuestionAnswering.from_pretrained(broken)
    monkeypatch.chdir(tmp_path)  # a relative folder name resolves the same way
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        AutoModelForQuestionAnswering.from_pretrained("broken")


@pytest.mark.parametrize("edit", ["activation_bits", "weight_bits", "other save's weights"])
def test_edited_or_mixed_checkpoint_through_from_pretrained(bert_qa, tmp_path: Path, edit: str) -> None:
    import shutil

    _, _, directory, _ = bert_qa
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    if edit == "other save's weights":
        torch.manual_seed(5)
        other = quantize(BertForQuestionAnswering(BertConfig(**TINY)).eval(), _batches(), AdaQuantConfig(**LIGHT))
        save_quantized(other, tmp_path / "other")
        shutil.copy(tmp_path / "other" / WEIGHTS_NAME, broken / WEIGHTS_NAME)
    else:
        config = json.loads((broken / "config.json").read_text())
        layer = config["quantization_config"]["checkpoint_layout"]["layers"]["bert.encoder.layer.0.output.dense"]
        layer[edit] = 2 if edit == "activation_bits" else 8
        (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="saved by different runs, or edited") as info:
        AutoModelForQuestionAnswering.from_pretrained(broken)
    assert f"{broken / 'config.json'} does not belong to {broken / WEIGHTS_NAME}" in str(info.value)
    with pytest.raises(CheckpointError, match="does not belong to"):
        hf_adaquant.load_quantized(broken)


# ----------------------------------------------------------------- save_pretrained of a model quantize() returned
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(VOCAB), max_position_embeddings=64)
    return LlamaForCausalLM(config).eval(), transformers.AutoModelForCausalLM


def _tiny_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(4)
    config = DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, vocab_size=len(VOCAB),
                              max_position_embeddings=64, num_labels=3)
    return DistilBertForSequenceClassification(config).eval(), AutoModelForSequenceClassification


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_distilbert])
def test_save_pretrained_of_quantize_result_is_the_quantized_checkpoint(tmp_path: Path, build) -> None:
    model, auto = build()
    qmodel = quantize(model, _batches(), AdaQuantConfig(**LIGHT))
    qmodel.save_pretrained(tmp_path / "q")
    assert WEIGHTS_NAME in {p.name for p in (tmp_path / "q").iterdir()}
    assert not (tmp_path / "q" / "model.safetensors").exists()  # never a float checkpoint
    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "adaquant" and qconfig["checkpoint_layout"]["layers"]
    loaded = auto.from_pretrained(tmp_path / "q")
    assert any(isinstance(m, QModuleMixin) for m in loaded.modules())
    for batch in _batches(2, seed=11):
        assert _diff(loaded, qmodel, batch) <= 1e-6
    assert getattr(model.config, "quantization_config", None) is None  # the float model is not marked


def _uploaded(api, repo_id: str, revision: str | None = None) -> dict[str, bytes]:
    folder = api.repo_dir(repo_id, revision)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_push_to_hub_of_quantize_result_uploads_the_quantized_checkpoint(bert_qa, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from tests.hub_standin import LocalHubApi

    _, qmodel, _, _ = bert_qa
    api = LocalHubApi(tmp_path / "hub")
    qmodel.push_to_hub("someone/tiny-bert-w4a8", private=True, revision="v1", commit_message="m",
                       commit_description="d", create_pr=False, tags=["squad"], token="hf_tok",
                       max_shard_size="1GB", api=api)
    uploaded = _uploaded(api, "someone/tiny-bert-w4a8", "v1")
    assert WEIGHTS_NAME in uploaded and "model.safetensors" not in uploaded
    assert json.loads(uploaded["config.json"])["quantization_config"]["quant_method"] == "adaquant"
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.library_name == "hf-adaquant" and "squad" in card.data.tags  # our card, not transformers'
    assert "`bert.encoder.layer.0.output.dense` | 4 | 8 |" in card.text  # bits per layer
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "create_commit"]  # one commit
    assert api.calls[0][1]["private"] is True
    commit = api.calls[2][1]
    assert (commit["revision"], commit["commit_message"], commit["commit_description"], commit["token"]) == \
        ("v1", "m", "d", "hf_tok")


def test_save_pretrained_push_to_hub_forwards_arguments(bert_qa, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from tests.hub_standin import LocalHubApi

    _, qmodel, q_dir, _ = bert_qa
    api = LocalHubApi(tmp_path / "hub")
    qmodel.save_pretrained(tmp_path / "tiny-q", push_to_hub=True, private=False, commit_description="desc",
                           tags=["t1"], create_pr=True, max_shard_size="1GB", api=api)
    assert (tmp_path / "tiny-q" / WEIGHTS_NAME).is_file() and not (tmp_path / "tiny-q" / "README.md").exists()
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    commit = api.calls[1][1]
    assert commit["repo_id"] == "tiny-q" and commit["create_pr"] is True  # repo_id: the folder name
    assert commit["commit_description"] == "desc"
    card = ModelCard(_uploaded(api, "tiny-q")["README.md"].decode())
    assert "t1" in card.data.tags and card.data.library_name == "hf-adaquant"

    # a model loaded back with from_pretrained pushes our card too
    loaded = AutoModelForQuestionAnswering.from_pretrained(q_dir)
    api2 = LocalHubApi(tmp_path / "hub2")
    loaded.push_to_hub("someone/again", api=api2)
    uploaded = _uploaded(api2, "someone/again")
    assert WEIGHTS_NAME in uploaded and "model.safetensors" not in uploaded
    assert ModelCard(uploaded["README.md"].decode()).data.library_name == "hf-adaquant"


# ------------------------------------------------------------------------------------------------ quantize on load
def test_quantize_on_load_equals_adaquant_quantizer(bert_qa, tmp_path: Path) -> None:
    _, _, _, fp_dir = bert_qa
    tokenizer = BertTokenizer.from_pretrained(fp_dir)
    texts = _texts(16, seed=0)
    config = AdaQuantConfig(weight_bits=4, activation_bits=8, iterations=5, batch_size=8, bias_tuning_steps=2,
                            progress=False, seed=0, dataset=texts, tokenizer=tokenizer, num_samples=16,
                            max_length=16, calibration_batch_size=8)
    on_load = AutoModelForQuestionAnswering.from_pretrained(fp_dir, quantization_config=config)
    assert isinstance(on_load.bert.encoder.layer[1].output.dense, QLinear)

    quantizer = AdaQuantQuantizer.from_pretrained(fp_dir)
    calib = quantizer.get_calibration_dataset(
        texts, num_samples=16, seed=0,
        preprocess_function=lambda rows: tokenizer(rows["text"], truncation=True, max_length=16,
                                                   padding="max_length"))
    explicit = quantizer.quantize(config.replace(dataset=None, tokenizer=None), calib, batch_size=8)
    batch = dict(tokenizer(_texts(4, seed=9), padding="max_length", max_length=16, return_tensors="pt"))
    assert _diff(on_load, explicit, batch) <= 1e-6
    q1 = {n: m for n, m in on_load.named_modules() if isinstance(m, QModuleMixin)}
    q2 = {n: m for n, m in explicit.named_modules() if isinstance(m, QModuleMixin)}
    assert q1.keys() == q2.keys()
    for name in q1:
        assert torch.equal(q1[name].weight_quantizer.int_codes(q1[name].weight),
                           q2[name].weight_quantizer.int_codes(q2[name].weight)), name

    on_load.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["dataset"] is None and saved["checkpoint_layout"]["version"] == 2  # quantized embedding tables
    reloaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "saved")
    assert _diff(reloaded, explicit, batch) <= 1e-6


def test_quantize_on_load_without_data_is_refused(bert_qa) -> None:
    _, _, _, fp_dir = bert_qa
    with pytest.raises(ValueError, match="needs calibration data"):
        AutoModelForQuestionAnswering.from_pretrained(fp_dir, quantization_config=AdaQuantConfig(progress=False))
