"""The sensitivity cache key holds exactly the config fields the measurement reads (allocation/sensitivity.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_adaquant import AdaQuantConfig
from hf_adaquant.allocation import sensitivity as sensitivity_module
from hf_adaquant.allocation.sensitivity import (SENSITIVITY_ADVANCED_FIELDS, SENSITIVITY_FIELDS, measure_sensitivity,
                                                sensitivity_fingerprint)
from hf_adaquant.config.stages import SENSITIVITY, SENSITIVITY_ADVANCED

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.config_reads import record_config_reads  # noqa: E402

CONFIG_FIELDS = list(AdaQuantConfig.field_names())
LAYER_NAMES = ["0", "2", "4"]


def _with(config: AdaQuantConfig, name: str, value: object) -> AdaQuantConfig:
    """``config`` with one attribute set to ``value``, unvalidated: the key must react to any change."""
    changed = config.replace()
    setattr(changed, name, value)
    return changed


def _key(config: AdaQuantConfig) -> dict:
    return sensitivity_fingerprint(config, LAYER_NAMES, model_hash="m", data_hash="d")


def test_declared_fields_are_config_fields() -> None:
    unknown = sorted(set(SENSITIVITY_FIELDS + SENSITIVITY_ADVANCED_FIELDS) - set(CONFIG_FIELDS))
    assert not unknown, f"SENSITIVITY_FIELDS name fields AdaQuantConfig does not have: {unknown}"
    # the fields issue #16 found missing from the old allow-list
    assert {"weight_rounding", "rounding_regularization", "lr_rounding"} <= set(SENSITIVITY_ADVANCED_FIELDS)
    # one declaration, with the other stages' (hf_adaquant.config.stages)
    assert SENSITIVITY_FIELDS == SENSITIVITY.reads and SENSITIVITY_ADVANCED_FIELDS == SENSITIVITY_ADVANCED.reads


@pytest.mark.parametrize("pipeline", ["light", "advanced"])
@pytest.mark.parametrize("name", CONFIG_FIELDS)
def test_key_changes_exactly_with_the_fields_the_stage_reads(pipeline: str, name: str) -> None:
    config = AdaQuantConfig(pipeline=pipeline, progress=False)
    read = set(SENSITIVITY_FIELDS) | (set(SENSITIVITY_ADVANCED_FIELDS) if pipeline == "advanced" else set())
    read.add("activation_bits")  # read as "weight-only or not": a change to/from None
    changed = _key(_with(config, name, "<changed>" if name != "activation_bits" else None))
    if name in read:
        assert changed != _key(config), f"{name} is read by the sensitivity stage but not in its cache key"
    else:
        assert changed == _key(config), f"{name} is not read by the sensitivity stage but changes its cache key"


def test_activation_bits_value_does_not_matter_only_weight_only() -> None:
    config = AdaQuantConfig(progress=False)
    assert _key(config.replace(activation_bits=4)) == _key(config.replace(activation_bits=8))
    assert _key(config.replace(activation_bits=None)) != _key(config)


def _tiny() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    return model, [x[:16], x[16:]]


def test_cache_is_reused_or_recomputed_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Advanced pipeline on a tiny MLP: a rounding field invalidates the cache, a bias-tuning field does not."""
    model, batches = _tiny()
    path = tmp_path / "sens.json"
    config = AdaQuantConfig(pipeline="advanced", first_last_bits=None, candidate_weight_bits=[2, 4],
                            candidate_activation_bits=[8], iterations=2, batch_size=8, progress=False)
    first = measure_sensitivity(model, batches, config, cache_path=path, progress=False)
    fits: list[str] = []
    real_fit = sensitivity_module._fit_layer

    def counting_fit(*args, **kwargs):
        fits.append(args[1])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sensitivity_module, "_fit_layer", counting_fit)
    again = measure_sensitivity(model, batches, config.replace(bias_tuning_steps=config.bias_tuning_steps + 7),
                                cache_path=path, progress=False)
    assert fits == [] and again.to_dict() == first.to_dict()  # not read by this stage: cached
    measure_sensitivity(model, batches, config.replace(lr_rounding=config.lr_rounding * 2), cache_path=path,
                        progress=False)
    assert len(fits) == 3 * 2  # three layers x two options: recomputed


@pytest.mark.parametrize("pipeline", ["light", "advanced"])
def test_the_measurement_reads_only_declared_fields(pipeline: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the code reads, recorded, is inside the declaration (its key fields, plus the route fields that do not
    change the values): a field the measurement starts reading without declaring it fails here."""
    model, batches = _tiny()
    config = AdaQuantConfig(pipeline=pipeline, first_last_bits=None, candidate_weight_bits=[2, 4],
                            candidate_activation_bits=[8], iterations=2, batch_size=8, progress=False)
    reads = record_config_reads(monkeypatch)
    measure_sensitivity(model, batches, config, progress=False)
    declared = set(SENSITIVITY.reads + SENSITIVITY.route)
    if pipeline == "advanced":
        declared |= set(SENSITIVITY_ADVANCED.reads)
    assert reads, "nothing recorded: the recorder does not see the config's reads"
    assert reads <= declared, f"read but not declared in hf_adaquant.config.stages: {sorted(reads - declared)}"
