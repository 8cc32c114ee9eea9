"""Our metrics as evaluate modules: they load offline by path and give today's numbers; progress and verbosity."""

from __future__ import annotations

import logging
import subprocess
import sys

import evaluate
import pytest
import torch

import hf_adaquant
from hf_adaquant.evaluation import evaluate_classifier, top1_from_logits
from hf_adaquant.metrics import load_metric, metric_path
from hf_adaquant.tasks.squad import Squad
from hf_adaquant.utils.logging import disable_progress_bars, enable_progress_bars, progress_bar

PREDICTIONS = [{"id": "a", "prediction_text": "the Denver Broncos"}, {"id": "b", "prediction_text": "Santa Clara"},
               {"id": "c", "prediction_text": "gold"}]
REFERENCES = [{"id": "a", "answers": {"text": ["Denver Broncos", "Broncos"], "answer_start": [0, 7]}},
              {"id": "b", "answers": {"text": ["Levi's Stadium in Santa Clara, California"], "answer_start": [3]}},
              {"id": "c", "answers": {"text": ["golden anniversary", "gold"], "answer_start": [1, 1]}}]


def test_metrics_load_offline_by_path_in_a_fresh_process(tmp_path):
    code = ("import evaluate, hf_adaquant.metrics as m; "
            "s = evaluate.load(m.metric_path('squad')); t = evaluate.load(m.metric_path('top1_accuracy')); "
            "print(isinstance(s, evaluate.Metric), isinstance(t, evaluate.Metric), "
            "t.compute(predictions=[1, 2], references=[1, 3])['accuracy'])")
    env = {"HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_ENDPOINT": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "0.5"]


def test_squad_module_agrees_with_library_metric():
    module = load_metric("squad")
    assert isinstance(module, evaluate.Metric)
    expected = Squad().compute(predictions=PREDICTIONS, references=REFERENCES)
    assert module.compute(predictions=PREDICTIONS, references=REFERENCES) == expected
    assert expected["exact_match"] == pytest.approx(200 / 3)
    for p, r in zip(PREDICTIONS, REFERENCES):  # incremental use, as evaluate's squad
        module.add_batch(predictions=[p], references=[r])
    assert module.compute() == expected
    with pytest.raises(ValueError, match="unknown metric"):
        metric_path("bleu")


def test_top1_module_agrees_with_today_numbers():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(97, 7, generator=g), torch.randint(0, 7, (97,), generator=g)
    result = evaluate.load(metric_path("top1_accuracy")).compute(predictions=logits.argmax(-1), references=labels)
    assert 100.0 * result["correct"] / result["total"] == top1_from_logits(logits, labels)
    assert result["accuracy"] == result["correct"] / 97

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    x, y = torch.randn(53, 3, 2, 2, generator=g), torch.randint(0, 5, (53,), generator=g)
    with torch.no_grad():
        today = 100.0 * (model(x).argmax(-1) == y).sum().item() / 53  # the former hand-written loop
    assert evaluate_classifier(model, x, y, batch_size=10) == today
    assert evaluate_classifier(model, x[:0], y[:0]) == 0.0


def test_progress_bars_follow_hugging_face_switches(monkeypatch):
    assert not progress_bar(range(3)).disable
    assert progress_bar(range(3), disable=True).disable
    disable_progress_bars()
    try:
        assert progress_bar(range(3)).disable
    finally:
        enable_progress_bars()
    assert not progress_bar(range(3)).disable
    import huggingface_hub.utils as hub_utils

    hub_utils.disable_progress_bars()  # every group, as HF_HUB_DISABLE_PROGRESS_BARS=1 does
    try:
        assert progress_bar(range(3)).disable
    finally:
        hub_utils.enable_progress_bars()


def test_quantization_bars_follow_the_switches(capsys):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    config = hf_adaquant.AdaQuantConfig(iterations=2, bias_tuning_steps=2, pipeline="advanced")
    hf_adaquant.quantize(model, [torch.randn(4, 3, 8, 8)], config)
    shown = capsys.readouterr().err
    assert "AdaQuant (sequential)" in shown and "bias tuning" in shown
    disable_progress_bars()
    try:
        hf_adaquant.quantize(model, [torch.randn(4, 3, 8, 8)], config)
    finally:
        enable_progress_bars()
    assert capsys.readouterr().err == ""


def test_progress_bars_env_var_in_a_fresh_process():
    code = "from hf_adaquant.utils.logging import progress_bar; print(progress_bar(range(2)).disable)"
    for value, expected in (("1", "True"), ("0", "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={"HF_HUB_DISABLE_PROGRESS_BARS": value, "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected


def test_set_verbosity():
    before = logging.getLogger("hf_adaquant").level
    try:
        hf_adaquant.set_verbosity("ERROR")
        assert hf_adaquant.get_verbosity() == logging.ERROR
        assert not logging.getLogger("hf_adaquant.quantize").isEnabledFor(logging.WARNING)
        hf_adaquant.set_verbosity(logging.DEBUG)
        assert logging.getLogger("hf_adaquant.hub.push").isEnabledFor(logging.DEBUG)
    finally:
        logging.getLogger("hf_adaquant").setLevel(before)


def test_py_typed_is_shipped():
    from importlib.resources import files

    assert (files("hf_adaquant") / "py.typed").is_file()
