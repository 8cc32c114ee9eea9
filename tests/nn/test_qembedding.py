"""Quantized embedding tables: 8 bits per value by default (per-row step and zero-point), the same table in the
quantized model, the checkpoint, the packed model and the ONNX file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from hf_adaquant import AdaQuantConfig, freeze, load_quantized, quantize, save_quantized
from hf_adaquant.nn.qembedding import FrozenQEmbedding, QEmbedding, pack_rows, row_nbytes, unpack_rows
from hf_adaquant.serialization import CheckpointError
from hf_adaquant.size import model_size

transformers = pytest.importorskip("transformers")

TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def light(**changes: object) -> AdaQuantConfig:
    base = dict(weight_bits=4, activation_bits=8, pipeline="light", progress=False, seed=0)
    return AdaQuantConfig(**{**base, **changes})  # type: ignore[arg-type]


def tiny_bert(vocab: int = 120, hidden: int = 32, layers: int = 2, cls: type | None = None,
              intermediate: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=intermediate or 2 * hidden,
                                     max_position_embeddings=64)
    return (cls or transformers.BertForQuestionAnswering)(config).eval()


def bert_batches(vocab: int = 120, n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[0, 10:] = 0
    types = (torch.arange(16) >= 8).long().expand(4, 16).clone()
    return [{"input_ids": torch.randint(1, vocab, (4, 16), generator=g), "attention_mask": mask,
             "token_type_ids": types} for _ in range(n)]


@pytest.fixture(scope="module")
def bert_w4a8() -> tuple[nn.Module, nn.Module, list[dict[str, torch.Tensor]]]:
    model, batches = tiny_bert(), bert_batches()
    return model, quantize(model, batches, light()), batches


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return torch.cat([out.start_logits, out.end_logits])


def weights_file(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "adaquant_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ---------------------------------------------------------------------------------------------- the tables
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [8, 13])
def test_rows_pack_and_unpack_exactly(bits: int, dim: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, dim), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, row_nbytes(dim, bits))
    assert torch.equal(unpack_rows(packed, bits, dim), codes)
    rows = torch.tensor([[3, 0], [6, 6]])  # gathered packed rows unpack to the same rows
    assert torch.equal(unpack_rows(packed[rows], bits, dim), codes[rows])


def test_each_row_on_its_own_8_bit_grid(bert_w4a8) -> None:
    model, qmodel, _ = bert_w4a8
    for name in TABLES:
        table = getattr(qmodel.bert.embeddings, name)
        original = getattr(model.bert.embeddings, name).weight
        assert type(table) is QEmbedding and table.bits == 8 and not table.weight.requires_grad
        codes = table.int_codes()
        assert int(codes.min()) >= 0 and int(codes.max()) <= 255
        step = table.weight_scale.unsqueeze(1)
        rebuilt = (codes.float() - table.weight_zero_point.unsqueeze(1).float()) * step
        assert torch.equal(rebuilt, table.weight)  # the model computes with grid points
        assert bool(((table.weight - original).abs() <= step / 2 + 1e-7).all())  # min-max per row: rounding only
    assert qmodel.hf_adaquant_report.config["embedding_bits"] == 8


def test_embedding_bits_none_keeps_float_tables_and_exclude_applies() -> None:
    model, batches = tiny_bert(), bert_batches()
    kept = quantize(model, batches, light(embedding_bits=None))
    assert all(type(getattr(kept.bert.embeddings, n)) is nn.Embedding for n in TABLES)
    assert torch.equal(kept.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    partly = quantize(model, batches, light(embedding_bits=4, exclude="*position_embeddings"))
    assert type(partly.bert.embeddings.position_embeddings) is nn.Embedding
    assert partly.bert.embeddings.word_embeddings.bits == 4


def test_a_table_tied_to_the_lm_head_stays_float() -> None:
    model = tiny_bert(cls=transformers.BertForMaskedLM)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    batches = [{k: v for k, v in b.items()} for b in bert_batches()]
    qmodel = quantize(model, batches, light(exclude="cls.*"))
    assert type(qmodel.bert.embeddings.word_embeddings) is nn.Embedding
    assert type(qmodel.bert.embeddings.position_embeddings) is QEmbedding


# ----------------------------------------------------------------------------------- checkpoint, reload, freeze
def test_checkpoint_stores_codes_and_every_reload_computes_the_same(bert_w4a8, tmp_path: Path) -> None:
    _, qmodel, batches = bert_w4a8
    save_quantized(qmodel, tmp_path / "q")
    stored = weights_file(tmp_path / "q")
    layout = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["checkpoint_layout"]
    assert layout["version"] == 2
    word = "bert.embeddings.word_embeddings"
    assert layout["embeddings"][word] == {"bits": 8, "shape": [120, 32]}
    assert stored[f"{word}.weight_packed"].dtype == torch.uint8 and stored[f"{word}.weight_packed"].shape == (120, 32)
    assert f"{word}.weight" not in stored
    ref = logits(qmodel, batches[1])
    for packed in (False, True):
        reloaded = load_quantized(tmp_path / "q", packed=packed)
        table = reloaded.bert.embeddings.word_embeddings
        assert type(table) is (FrozenQEmbedding if packed else QEmbedding)
        assert torch.equal(logits(reloaded, batches[1]), ref)
    auto = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "q")
    assert type(auto.bert.embeddings.word_embeddings) is QEmbedding
    assert torch.equal(logits(auto, batches[1]), ref)
    # a frozen model saves the same checkpoint
    frozen = freeze(load_quantized(tmp_path / "q"))
    save_quantized(frozen, tmp_path / "again")
    assert all(torch.equal(v, weights_file(tmp_path / "again")[k]) for k, v in stored.items())


def test_frozen_table_holds_one_byte_per_value(bert_w4a8) -> None:
    _, qmodel, batches = bert_w4a8
    frozen = freeze(copy.deepcopy(qmodel))
    table = frozen.bert.embeddings.word_embeddings
    assert isinstance(table, FrozenQEmbedding) and "weight" not in table._parameters
    assert table.weight_packed.dtype == torch.uint8 and table.weight_packed.numel() == 120 * 32
    assert torch.equal(logits(frozen, batches[0]), logits(qmodel, batches[0]))
    assert torch.equal(table.weight, qmodel.bert.embeddings.word_embeddings.weight)


def test_checkpoint_size_with_and_without_quantized_tables(tmp_path: Path) -> None:
    model, batches = tiny_bert(vocab=2000), bert_batches(vocab=2000)
    sizes = {}
    for bits in (8, None):
        save_quantized(quantize(model, batches, light(embedding_bits=bits)), tmp_path / str(bits))
        sizes[bits] = (tmp_path / str(bits) / "adaquant_model.safetensors").stat().st_size
    tables = sum(getattr(model.bert.embeddings, n).weight.numel() for n in TABLES)
    rows = sum(getattr(model.bert.embeddings, n).num_embeddings for n in TABLES)
    # 4 bytes per value float, 1 byte per value + 8 bytes per row (step, zero-point) quantized
    assert sizes[None] - sizes[8] == pytest.approx(tables * 3 - rows * 8, abs=4096)


def test_w4a8_checkpoint_of_a_small_bert_is_a_quarter_of_fp32(tmp_path: Path) -> None:
    """MiniLM's proportions scaled down (intermediate 4 x hidden, the tables over half of the FP32 file)."""
    model, batches = tiny_bert(vocab=4000, hidden=128, intermediate=512), bert_batches(vocab=4000)
    fp32 = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    ratios = {}
    for bits in (8, None):
        qmodel = quantize(model, batches, light(embedding_bits=bits, first_last_bits=None))
        save_quantized(qmodel, tmp_path / str(bits))
        ratios[bits] = (tmp_path / str(bits) / "adaquant_model.safetensors").stat().st_size / fp32
        assert model_size(qmodel).ratio == pytest.approx(ratios[bits], abs=0.02)  # the size report agrees
    assert ratios[8] <= 0.25 < 0.6 <= ratios[None], ratios


# ------------------------------------------------------------------------------------------------ bad input
def test_a_stored_zero_point_off_the_grid_is_refused(bert_w4a8, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    _, qmodel, _ = bert_w4a8
    save_quantized(qmodel, tmp_path / "q")
    path = tmp_path / "q" / "adaquant_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["bert.embeddings.word_embeddings.weight_zero_point"][3] = 300
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="corrupted"):  # the digest catches it first
        load_quantized(tmp_path / "q")
    from hf_adaquant.serialization.checkpoint import write_weights

    layout = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["checkpoint_layout"]
    write_weights(tensors, path, layout)  # a valid digest over the bad value: the layout check names the table
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    from hf_adaquant.serialization.checkpoint import _DIGEST_KEY

    with safe_open(str(path), framework="pt") as f:
        config["quantization_config"]["checkpoint_layout"]["weights_sha256"] = f.metadata()[_DIGEST_KEY]
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"embedding 'bert.embeddings.word_embeddings'.*weight_zero_point"):
        load_quantized(tmp_path / "q")


def test_an_unknown_layout_version_is_refused(bert_w4a8, tmp_path: Path) -> None:
    _, qmodel, _ = bert_w4a8
    save_quantized(qmodel, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["checkpoint_layout"]["version"] = 99
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layout version 99 is not supported"):
        load_quantized(tmp_path / "q")


# --------------------------------------------------------------------------------------------------------- ONNX
class LookupHead(nn.Module):
    """An embedding and a linear layer; returns the looked-up rows too, so they can be compared bitwise."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(50, 12)
        self.fc = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.table(ids)
        return rows, self.fc(rows)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_onnx_gathers_integer_codes_with_pytorch_numbers(bits: int, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from hf_adaquant import export_onnx

    torch.manual_seed(0)
    model = LookupHead().eval()
    batches = [torch.randint(0, 50, (8, 5)) for _ in range(2)]
    qmodel = quantize(model, batches, light(weight_bits=8, embedding_bits=bits))
    for variant, source in (("plain", qmodel), ("frozen", freeze(copy.deepcopy(qmodel)))):
        path = export_onnx(source, tmp_path / f"{variant}.onnx", batches[0])
        graph = onnx.load(str(path)).graph
        inits = {t.name: t for t in graph.initializer}
        assert inits["table.weight_quantized"].data_type == onnx.TensorProto.UINT8
        assert list(inits["table.weight_quantized"].dims) == [50, 12]
        assert not [n for n, t in inits.items() if n.startswith("table.") and list(t.dims) == [50, 12]
                    and t.data_type == onnx.TensorProto.FLOAT]  # no float table left
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ids = torch.randint(0, 50, (3, 5))  # another batch size (the dynamic axis)
        rows, _ = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
        with torch.no_grad():
            assert torch.equal(torch.from_numpy(rows), qmodel(ids)[0])


def test_bert_onnx_has_no_float_embedding_table(bert_w4a8, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from hf_adaquant import export_onnx

    _, qmodel, batches = bert_w4a8
    path = export_onnx(qmodel, tmp_path / "bert.onnx", batches[0])
    inits = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    for name in TABLES:
        codes = inits[f"bert.embeddings.{name}.weight_quantized"]
        assert codes.data_type == onnx.TensorProto.UINT8
        assert f"bert.embeddings.{name}.weight" not in inits
