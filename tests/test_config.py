"""AdaQuantConfig validation: every field is type-checked by name, accepted forms are normalised."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from hf_adaquant import AdaQuantConfig

FIELDS = [f.name for f in dataclasses.fields(AdaQuantConfig)]
# A value of the wrong type for each field; object() for every field not listed, so a new field without a check
# makes test_every_field_is_type_checked_by_name fail.
WRONG_TYPE = {"tokenizer": 5}


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_type_checked_by_name(name: str) -> None:
    value = WRONG_TYPE.get(name, object())
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        AdaQuantConfig(**{name: value})
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        AdaQuantConfig().replace(**{name: value})


@pytest.mark.parametrize("field, value, message", [
    ("seed", None, r"seed must be an integer, got NoneType None"),
    ("seed", 1.5, r"seed must be an integer, got float 1.5"),
    ("seed", True, r"seed must be an integer, got bool True"),
    ("lr_weight", "1e-3", r"lr_weight must be a finite number >= 0, got the string '1e-3'"),
    ("lr_bias", float("nan"), r"lr_bias must be a finite number >= 0"),
    ("lr_rounding", -1, r"lr_rounding must be a finite number >= 0, got -1"),
    ("max_calibration_samples", 2.5, r"max_calibration_samples must be an integer >= 1 or None, got float 2.5"),
    ("max_cache_bytes", -1, r"max_cache_bytes must be an integer >= 0, got -1"),
    ("bn_tuning", "no", r"bn_tuning must be True or False, got str 'no'"),
    ("progress", 1, r"progress must be True or False, got int 1"),
    ("iterations", True, r"iterations must be an integer >= 0, got bool True"),
    ("batch_size", 16.0, r"batch_size must be an integer >= 1, got float 16.0"),
    ("size_budget", 0, r"size_budget must be a finite number > 0 or None, got 0"),
    ("weight_deviation_limit", "2", r"weight_deviation_limit must be .*got the string '2'"),
    ("sensitivity_criterion", "KL", r"sensitivity_criterion must be one of \['kl', 'mse', 'task'\], got 'KL'"),
    ("weight_rounding", None, r"weight_rounding must be one of \['auto', 'free', 'learned'\]"),
    ("include", 5, r"include must be a layer-name pattern or a list of them"),
    ("exclude", ["conv1", 2], r"exclude must be a layer-name pattern or a list of them"),
    ("layer_bits", [("conv1", (4, 4))], r"layer_bits must be a dict"),
    ("layer_bits", {1: (4, 4)}, r"layer_bits key must be a layer name"),
    ("pinned_layers", {"fc": 8}, r"pinned_layers\['fc'\] must be \(weight_bits, activation_bits\)"),
    ("candidate_weight_bits", 4, r"candidate_weight_bits must be a list of bit-widths"),
    ("candidate_activation_bits", [8, True], r"candidate_activation_bits must be an integer in 2..8"),
    ("dataset_split", None, r"dataset_split must be a string"),
    ("text_column", 3, r"text_column must be a string or None"),
    ("version", 0, r"version must be an integer >= 1"),
    ("embedding_bits", 1, r"embedding_bits must be an integer in 2..8 or None, got 1"),
    ("embedding_bits", 8.0, r"embedding_bits must be an integer in 2..8 or None, got 8.0"),
])
def test_wrong_values_name_the_field_and_what_was_given(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaQuantConfig(**{field: value})


def test_accepted_forms_are_normalised() -> None:
    config = AdaQuantConfig(include="conv*", exclude=("fc",), layer_bits={"conv1": [8, None]},
                            pinned_layers={"fc": [8, 8]}, seed=np.int64(3), lr_weight=1, iterations=np.int32(5),
                            candidate_weight_bits=(np.int64(4), 8), max_calibration_samples=None)
    assert config.include == ["conv*"] and config.exclude == ["fc"]
    assert config.layer_bits == {"conv1": (8, None)} and config.pinned_layers == {"fc": (8, 8)}
    assert type(config.seed) is int and type(config.iterations) is int and config.lr_weight == 1
    assert config.candidate_weight_bits == [4, 8] and all(type(b) is int for b in config.candidate_weight_bits)
    # JSON round trip (numpy integers would not serialise)
    again = AdaQuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert AdaQuantConfig.from_dict({"layer_bits": None}).layer_bits == {}


def test_budget_with_layer_bits_is_refused_naming_both_and_pinned_layers() -> None:
    with pytest.raises(ValueError, match=r"size_budget cannot be combined with layer_bits.*pinned_layers"):
        AdaQuantConfig(size_budget=0.2, layer_bits={"conv1": (8, 8)})
    with pytest.raises(ValueError, match=r"size_budget and bops_budget cannot be combined with layer_bits"):
        AdaQuantConfig(size_budget=0.2, bops_budget=0.1, layer_bits={"conv1": (8, 8)})
    with pytest.raises(ValueError, match=r"bops_budget cannot be combined with layer_bits"):
        AdaQuantConfig(layer_bits={"conv1": (8, 8)}).replace(bops_budget=0.1)
    # What the message proposes works: pins inside a budget.
    assert AdaQuantConfig(size_budget=0.2, pinned_layers={"conv1": (8, 8)}).pinned_layers == {"conv1": (8, 8)}
    # A saved checkpoint's config (older versions stored both) still loads.
    saved = AdaQuantConfig(size_budget=0.2, layer_bits={"conv1": (8, 8)}, checkpoint_layout={"version": 1})
    assert saved.size_budget == 0.2 and saved.layer_bits == {"conv1": (8, 8)}
