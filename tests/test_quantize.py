"""End to end: the public API on timm / transformers models, determinism, bad input, real CIFAR-10 ResNet-20."""

from __future__ import annotations

import importlib
import math
import tempfile

import pytest
import torch
from tests.conftest import (
    TINY_CNN_LAYERS,
    assert_state_dict_equal,
    fast_config,
    fit_batchnorm_stats,
    make_batches,
    randomize_batchnorms,
    state_dict_clone,
)
from torch import nn

from hf_adaquant import AdaQuantConfig, QuantizationReport, quantize
from hf_adaquant.data.paths import shared_dir
from hf_adaquant.nn import QConv2d, QLinear

# The package re-exports the quantize() function under the submodule's name.
quantize_module = importlib.import_module("hf_adaquant.quantize")


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


# ------------------------------------------------------------------------------------------- report / API


def test_report_and_config_round_trip(quantized_tiny_cnn) -> None:
    model, qmodel, batches = quantized_tiny_cnn
    report = qmodel.hf_adaquant_report
    assert isinstance(report, QuantizationReport)
    assert list(report.plan) == TINY_CNN_LAYERS
    assert {"prepare", "adaquant", "bn_tuning", "bias_tuning"} <= set(report.stage_seconds)
    assert not {"calibrate_ranges", "bias_correction"} & set(report.stage_seconds)
    assert all(v >= 0 for v in report.stage_seconds.values())
    assert report.bn_tuned_layers == ["conv1", "conv2", "dw", "pw"]
    config = AdaQuantConfig.from_dict(report.config)
    assert config == fast_config(iterations=40)
    # Quantized, frozen, eval, same call signature and output shape.
    assert not qmodel.training and not any(p.requires_grad for p in qmodel.parameters())
    x = batches[0]
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    assert _corr(out, ref) > 0.9


def test_light_and_parallel_pipelines_run(tiny_cnn, calib_batches) -> None:
    light = quantize(tiny_cnn, calib_batches, fast_config(pipeline="light"))
    assert light.hf_adaquant_report.layers == [] and light.hf_adaquant_report.bias_tuning_kl is None
    stages = set(light.hf_adaquant_report.stage_seconds)
    assert {"prepare", "calibrate_ranges", "bn_tuning", "bias_correction"} <= stages
    assert not {"adaquant", "bias_tuning"} & stages
    par = quantize(tiny_cnn, calib_batches, fast_config(variant="parallel", iterations=10, bias_tuning=False))
    seq = quantize(tiny_cnn, calib_batches, fast_config(variant="sequential", iterations=10, bias_tuning=False))
    # Same first layer (same input either way), different later layers (different inputs).
    assert torch.equal(par.conv1.weight, seq.conv1.weight)
    assert not torch.equal(par.pw.weight, seq.pw.weight)
    x = torch.cat(calib_batches)
    with torch.no_grad():
        ref = tiny_cnn(x)
        for q in (light, par, seq):
            assert _corr(q(x), ref) > 0.9


def test_max_calibration_samples(tiny_cnn, calib_batches) -> None:
    q = quantize(tiny_cnn, calib_batches, fast_config(iterations=2, bias_tuning=False, max_calibration_samples=20))
    assert {l["num_samples"] for l in q.hf_adaquant_report.layers} == {32}  # whole batches: 2 of 16


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_bitwise_identical_models(tiny_cnn, calib_batches) -> None:
    config = fast_config(iterations=15, bias_tuning_steps=5, batch_size=8, seed=123)
    torch.manual_seed(999)  # global RNG state must not matter
    a = quantize(tiny_cnn, calib_batches, config)
    torch.manual_seed(1)
    b = quantize(tiny_cnn, calib_batches, config)
    assert_state_dict_equal(state_dict_clone(a), state_dict_clone(b))
    ra, rb = a.hf_adaquant_report, b.hf_adaquant_report
    assert [(l["mse_before"], l["mse_after"]) for l in ra.layers] == [(l["mse_before"], l["mse_after"])
                                                                     for l in rb.layers]
    assert ra.bias_tuning_kl == rb.bias_tuning_kl
    c = quantize(tiny_cnn, calib_batches, config.replace(seed=7))
    sa, sc = state_dict_clone(a), state_dict_clone(c)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # mini-batch order differs with the seed


# ------------------------------------------------------------------------------------------- timm / BERT


def test_timm_resnet18_quantizes() -> None:
    timm = pytest.importorskip("timm")
    batches = make_batches(2, 8)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    model = fit_batchnorm_stats(randomize_batchnorms(model, 0), batches)  # BN stats match the data
    before = state_dict_clone(model)
    config = fast_config(weight_bits=8, activation_bits=8, iterations=5, bias_tuning_steps=3,
                         weight_range_method="minmax")
    qmodel = quantize(model, batches, config)
    assert_state_dict_equal(before, state_dict_clone(model))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    for n in convs:
        assert isinstance(qmodel.get_submodule(n), QConv2d), n
    assert isinstance(qmodel.fc, QLinear)
    report = qmodel.hf_adaquant_report
    assert len(report.layers) == 21 and report.layers[0]["name"] == "conv1" and report.layers[-1]["name"] == "fc"
    assert all(l["mse_after"] <= l["mse_before"] for l in report.layers)
    x = make_batches(1, 16, seed=5)[0]  # held-out inputs
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert out.shape == ref.shape == (16, 10)
    assert _corr(out, ref) > 0.95
    assert ((out - ref).norm() / ref.norm()).item() < 0.3


def _tiny_bert_batches(num: int, seed: int, n: int = 8, length: int = 16, vocab: int = 100) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        ids = torch.randint(1, vocab, (n, length), generator=g)
        lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        types = (torch.arange(length)[None, :] >= length // 2).long()
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return batches


def test_bert_question_answering_w8a8() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(config).eval()
    before = state_dict_clone(model)
    batches = _tiny_bert_batches(4, seed=0)
    qmodel = quantize(model, batches, fast_config(weight_bits=8, activation_bits=8, iterations=10,
                                                  bias_tuning_steps=5))
    assert_state_dict_equal(before, state_dict_clone(model))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 6 + 1
    assert all(isinstance(qmodel.get_submodule(n), QLinear) for n in linears)
    assert list(qmodel.hf_adaquant_report.plan) == linears  # execution order = registration order here
    test = _tiny_bert_batches(1, seed=1)[0]
    with torch.no_grad():
        ref, out = model(**test), qmodel(**test)
    assert type(out) is type(ref)
    for key in ("start_logits", "end_logits"):
        a, b = getattr(ref, key), getattr(out, key)
        assert b.shape == a.shape == (8, 16)
        assert torch.isfinite(b).all()
        assert _corr(a, b) > 0.99
        assert ((a - b).norm() / a.norm()).item() < 0.1
    # Calibration batches given as a transformers BatchEncoding work too.
    encoding = transformers.BatchEncoding(batches[0])
    q2 = quantize(model, [encoding], fast_config(weight_bits=8, activation_bits=8, pipeline="light"))
    assert isinstance(q2.qa_outputs, QLinear)


# --------------------------------------------------------------------------------------------- bad input


def _nan_batches(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    bad = [b.clone() for b in batches]
    bad[2][3, 1, 4, 4] = float("nan")
    return bad


@pytest.mark.parametrize("case", ["nan", "inf", "empty", "no_layer", "wrong_input", "single_tensor",
                                  "unknown_override", "bits_mutated_after_build"])
def test_bad_input_is_rejected_and_model_untouched(case: str, tiny_cnn, calib_batches) -> None:
    model: nn.Module = tiny_cnn
    batches = calib_batches
    config = fast_config(iterations=2)
    error, match = ValueError, None
    if case == "nan":
        batches, match = _nan_batches(calib_batches), "NaN"
    elif case == "inf":
        batches = [b.clone() for b in calib_batches]
        batches[0][0, 0, 0, 0] = float("inf")
        match = "Inf"
    elif case == "empty":
        batches, match = [], "empty"
    elif case == "no_layer":
        model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        match = "no quantizable layer"
    elif case == "wrong_input":
        batches, match = [torch.randn(4, 5, 32, 32)], "calibration batch"
    elif case == "single_tensor":
        batches, error, match = calib_batches[0], TypeError, "iterable of batches"
    elif case == "unknown_override":
        config, match = fast_config(layer_bits={"conv9": (4, 4)}), "conv9"
    elif case == "bits_mutated_after_build":
        config.weight_bits, match = 9, "weight_bits"
    before = state_dict_clone(model)
    model.eval()
    with pytest.raises(error, match=match):
        quantize(model, batches, config)
    assert_state_dict_equal(before, state_dict_clone(model))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_nan_error_names_the_batch(tiny_cnn, calib_batches) -> None:
    with pytest.raises(ValueError, match=r"batch 2 .*NaN"):
        quantize(tiny_cnn, _nan_batches(calib_batches), fast_config())


@pytest.mark.parametrize("case, message", [
    ("channels", r"calibration batch 3, input 0: has shape \(4, 5, 32, 32\), but batch 0 has \(16, 3, 32, 32\) "
                 r"\(another number of channels\)"),
    ("dtype", r"calibration batch 3, input 0: has dtype torch.float64, but batch 0 has torch.float32"),
    ("dims", r"calibration batch 3, input 0: has shape \(16, 3, 32\), but batch 0 has \(16, 3, 32, 32\)"),
    ("container", r"calibration batch 3 is a tuple/list of 2 inputs, but batch 0 is a tensor"),
])
def test_a_bad_later_batch_is_refused_before_any_work(case: str, message: str, tiny_cnn, calib_batches,
                                                     tmp_path) -> None:
    """Every batch is checked against the first before anything runs: nothing is written to the work dir."""
    bad = {"channels": torch.randn(4, 5, 32, 32), "dtype": calib_batches[3].double(),
           "dims": calib_batches[3][:, :, 0], "container": (calib_batches[3], calib_batches[3])}[case]
    with pytest.raises(ValueError, match=message):
        quantize(tiny_cnn, calib_batches[:3] + [bad], fast_config(iterations=2), work_dir=tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_dict_batches_with_other_keys_are_refused_and_lengths_may_differ() -> None:
    from hf_adaquant.utils.batches import materialize_batches

    ids = {"input_ids": torch.ones(2, 7, dtype=torch.long), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    longer = {k: torch.ones(3, 12, dtype=torch.long) for k in ids}  # another sequence length: fine
    assert len(materialize_batches([ids, longer])) == 2
    with pytest.raises(ValueError, match=r"calibration batch 1 is a dict with keys \['input_ids'\], but batch 0 "
                                         r"is a dict with keys \['attention_mask', 'input_ids'\]"):
        materialize_batches([ids, {"input_ids": ids["input_ids"]}])


def _fixed_size_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()


@pytest.mark.parametrize("pipeline, variant", [("light", "sequential"), ("advanced", "parallel"),
                                               ("advanced", "sequential")])
def test_model_error_on_a_later_batch_names_it(pipeline: str, variant: str, tmp_path) -> None:
    """A batch of the right structure that the model rejects (8x8 images only): the error names batch 2 and keeps
    the model's own error as its cause; a corrected re-run on the same work dir runs when no layer was finished
    before the failure, and is refused (naming the difference) when one was."""
    from hf_adaquant.distributed import WorkDirMismatchError
    from hf_adaquant.utils.batches import CalibrationBatchError

    g = torch.Generator().manual_seed(0)
    good = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(4)]
    bad = good[:2] + [torch.randn(8, 3, 6, 6, generator=g)] + good[3:]
    config = fast_config(pipeline=pipeline, variant=variant, iterations=2, bias_tuning_steps=2)
    work = tmp_path / "work"
    with pytest.raises(CalibrationBatchError, match=r"the model failed on calibration batch 2: RuntimeError: "
                                                    r"mat1 and mat2 shapes cannot be multiplied") as info:
        quantize(_fixed_size_model(), bad, config, work_dir=work)
    assert info.value.batch_index == 2 and isinstance(info.value.__cause__, RuntimeError)
    if pipeline == "light":
        return
    finished = list((work / "layers").glob("*.safetensors"))
    if variant == "parallel":  # the capture failed before any layer was optimised: the re-run is accepted
        assert finished == []
        quantize(_fixed_size_model(), good, config, work_dir=work)
    else:  # layer "0" was finished on the bad data: mixing it with the corrected run is refused
        assert [p.name for p in finished] == ["0.safetensors"]
        with pytest.raises(WorkDirMismatchError, match="calibration data"):
            quantize(_fixed_size_model(), good, config, work_dir=work)


@pytest.mark.parametrize("field,value", [("pipeline", "heavy"), ("variant", "diagonal"),
                                         ("weight_range_method", "entropy"),
                                         ("activation_range_method", "kl"), ("cache_dtype", "int8"),
                                         ("batch_size", 0), ("iterations", -1)])
def test_unknown_names_rejected_at_config_build(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        AdaQuantConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        AdaQuantConfig().replace(**{field: value})
    with pytest.raises(ValueError, match="unknown AdaQuantConfig fields"):
        AdaQuantConfig.from_dict({"weight_bit": 4})


def test_failure_midway_leaves_callers_model_untouched(tiny_cnn, calib_batches,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    before = state_dict_clone(tiny_cnn)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in BN tuning")

    monkeypatch.setattr(quantize_module, "tune_batchnorm", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        quantize(tiny_cnn, calib_batches, fast_config(iterations=3))
    assert_state_dict_equal(before, state_dict_clone(tiny_cnn))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_cnn.modules())


def test_cache_spilling_quantize_matches_in_memory(tiny_cnn, calib_batches, tmp_path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """max_cache_bytes only moves cached activations to disk; the result must not change."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # spill files go to pytest's tmp dir
    config = fast_config(iterations=5, bias_tuning_steps=3, batch_size=8)
    in_memory = quantize(tiny_cnn, calib_batches, config)
    spilled = quantize(tiny_cnn, calib_batches, config.replace(max_cache_bytes=600_000))
    assert_state_dict_equal(state_dict_clone(in_memory), state_dict_clone(spilled))


# ------------------------------------------------------------------------------------ real CIFAR-10 model

SHARED = shared_dir()


@pytest.mark.skipif(
    SHARED is None or not (SHARED / "models/cifar10-resnet/resnet20-12fca82f.th").is_file()
    or not (SHARED / "data/cifar10/calib.npz").is_file(),
    reason="shared CIFAR-10 ResNet-20 checkpoint / data not found (../shared or $HF_ADAQUANT_SHARED)",
)
def test_cifar10_resnet20_w4a4_advanced_beats_naive() -> None:
    from hf_adaquant.data.cifar import load_cifar10_npz
    from hf_adaquant.evaluation import evaluate_classifier
    from hf_adaquant.models.cifar_resnet import load_cifar_resnet

    model = load_cifar_resnet(20, SHARED / "models/cifar10-resnet/resnet20-12fca82f.th")
    x_cal, _ = load_cifar10_npz(SHARED / "data/cifar10/calib.npz", limit=256)
    x_test, y_test = load_cifar10_npz(SHARED / "data/cifar10/test.npz", limit=1000)
    batches = [x_cal[i:i + 32] for i in range(0, 256, 32)]
    naive_cfg = AdaQuantConfig(weight_bits=4, activation_bits=4, pipeline="light", bn_tuning=False,
                               bias_correction=False, weight_range_method="minmax",
                               activation_range_method="minmax", progress=False)
    adv_cfg = AdaQuantConfig(weight_bits=4, activation_bits=4, pipeline="advanced", iterations=100,
                             bias_tuning_steps=50, batch_size=32, seed=0, progress=False)
    naive = evaluate_classifier(quantize(model, batches, naive_cfg), x_test, y_test)
    advanced_model = quantize(model, batches, adv_cfg)
    advanced = evaluate_classifier(advanced_model, x_test, y_test)
    assert not math.isnan(advanced)
    report = advanced_model.hf_adaquant_report
    assert len(report.layers) == 20 and all(l["mse_after"] <= l["mse_before"] for l in report.layers)
    assert report.bias_tuning_kl[1] <= report.bias_tuning_kl[0]
    assert advanced > naive + 1.0, f"advanced W4A4 {advanced:.1f}% vs naive {naive:.1f}%"
