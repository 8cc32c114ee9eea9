"""Hub: a checkpoint folder holding ``model.onnx`` uploads it, and the card's onnxruntime snippet runs as written."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import make_batches, make_tiny_cnn
from tests.hub_standin import LocalHubApi

from hf_adaquant import AdaQuantConfig, export_onnx, quantize, save_quantized
from hf_adaquant.hub import push_to_hub

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

LIGHT = dict(weight_bits=4, activation_bits=8, pipeline="light", progress=False, seed=0)


def _snippet(card: str) -> str:
    section = card.split("## Run with onnxruntime", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_snippet(code: str, repo_dir: Path, monkeypatch: pytest.MonkeyPatch, repo_id: str) -> dict:
    """Execute the card's code against the stand-in Hub's copy of the repository."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(repo_dir / name))
    namespace: dict = {}
    exec(code.replace(f'"{repo_id}"', repr(str(repo_dir))), namespace)  # noqa: S102 - the card's own snippet
    return namespace


def test_onnx_file_is_uploaded_and_the_card_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = make_batches(2, 8)
    qmodel = quantize(make_tiny_cnn(0, batches), batches, AdaQuantConfig(**LIGHT))
    folder = save_quantized(qmodel, tmp_path / "ckpt")
    export_onnx(qmodel, folder / "model.onnx", batches[0])
    api = LocalHubApi(tmp_path / "hub")
    push_to_hub(folder, "someone/cnn-w4a8", api=api)
    repo = api.repo_dir("someone/cnn-w4a8")
    assert (repo / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()
    card = (repo / "README.md").read_text()
    assert "- onnx" in card.split("---")[1]  # Hub tag
    assert "## Run with onnxruntime" in card and "`x`" in card
    code = _snippet(card)
    assert "np.zeros((1, 3, 32, 32)" in code  # the exported input's shape
    outputs = _run_snippet(code, repo, monkeypatch, "someone/cnn-w4a8")["outputs"]
    with torch.no_grad():
        ref = qmodel(torch.zeros(1, 3, 32, 32)).numpy()
    np.testing.assert_allclose(outputs[0], ref, rtol=0, atol=1e-3 * float(np.abs(ref).max()))


def test_transformers_card_snippet_tokenizes_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    from tests.integrations.test_transformers import TINY, VOCAB, _batches

    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(transformers.BertConfig(**TINY)).eval()
    batches = _batches()
    qmodel = quantize(model, batches, AdaQuantConfig(**LIGHT))
    folder = save_quantized(qmodel, tmp_path / "bert")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    export_onnx(qmodel, folder / "model.onnx", {**batches[0], "token_type_ids": torch.zeros_like(
        batches[0]["input_ids"])})
    api = LocalHubApi(tmp_path / "hub")
    push_to_hub(folder, "someone/bert-w4a8", api=api)
    repo = api.repo_dir("someone/bert-w4a8")
    card = (repo / "README.md").read_text()
    assert "`input_ids`, `attention_mask`, `token_type_ids`" in card
    namespace = _run_snippet(_snippet(card), repo, monkeypatch, "someone/bert-w4a8")
    encoded = namespace["encoded"]
    with torch.no_grad():
        ref = qmodel(**{k: torch.from_numpy(v) for k, v in encoded.items()})
    np.testing.assert_allclose(namespace["outputs"][0], ref.start_logits.numpy(), rtol=0, atol=0.05)


def test_no_onnx_section_without_the_file(tmp_path: Path) -> None:
    batches = make_batches(2, 8)
    qmodel = quantize(make_tiny_cnn(0, batches), batches, AdaQuantConfig(**LIGHT))
    folder = save_quantized(copy.deepcopy(qmodel), tmp_path / "ckpt")
    api = LocalHubApi(tmp_path / "hub")
    push_to_hub(folder, "someone/cnn", api=api)
    card = (api.repo_dir("someone/cnn") / "README.md").read_text()
    assert "onnxruntime" not in card and "- onnx" not in card
