"""AdaQuantConfig: every field is type-checked by name, accepted forms are normalised; sections and flat names."""

from __future__ import annotations

import ast
import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import hf_adaquant
from hf_adaquant import AdaQuantConfig
from hf_adaquant.config import (AdaQuantConfig as CoreAdaQuantConfig, AllocationConfig, OptimizerConfig,
                                ResourcesConfig, SavedConfig, SchemeConfig, TuningConfig)
from hf_adaquant.integrations.transformers_config import QuantizeOnLoadConfig

FIELDS = list(AdaQuantConfig.field_names())
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
    ("residual_output_bits", 1, r"residual_output_bits must be an integer in 2..8 or None, got 1"),
    ("residual_output_bits", 9, r"residual_output_bits must be an integer in 2..8 or None, got 9"),
    ("residual_output_bits", True, r"residual_output_bits must be an integer in 2..8 or None, got True"),
    ("residual_output_bits", "8", r"residual_output_bits must be an integer in 2..8 or None, got '8'"),
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


def test_residual_output_bits_is_left_out_of_saved_configs_while_off() -> None:
    """Off (None, the default) it is not written, so configs of runs without it read as before (and in versions
    that do not know it); on, it round-trips through JSON (numpy integers normalised)."""
    assert "residual_output_bits" not in AdaQuantConfig().to_dict()
    assert AdaQuantConfig.from_dict(AdaQuantConfig().to_dict()).residual_output_bits is None
    config = AdaQuantConfig(residual_output_bits=np.int64(8))
    assert type(config.residual_output_bits) is int and config.to_dict()["residual_output_bits"] == 8
    again = AdaQuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.scheme.residual_output_bits == 8


def test_residual_output_bits_is_refused_for_weight_only_schemes() -> None:
    with pytest.raises(ValueError, match=r"residual_output_bits needs quantized activations"):
        AdaQuantConfig(residual_output_bits=8, activation_bits=None)
    assert AdaQuantConfig(residual_output_bits=None, activation_bits=None).activation_bits is None


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


# ------------------------------------------------------------------------------------------ sections (issue #16)
SECTION_TYPES = {"scheme": SchemeConfig, "optimizer": OptimizerConfig, "tuning": TuningConfig,
                 "allocation": AllocationConfig, "resources": ResourcesConfig, "saved": SavedConfig,
                 "on_load": QuantizeOnLoadConfig}
# A valid value other than the default for every field.
OTHER_VALUE = {
    "weight_bits": 3, "activation_bits": None, "first_last_bits": None, "embedding_bits": None, "include": ["a*"],
    "exclude": ["b"], "layer_bits": {"c": (8, 8)}, "weight_symmetric": True, "activation_symmetric": True,
    "weight_range_method": "minmax", "activation_range_method": "mean_minmax", "residual_output_bits": 8,
    "pipeline": "light",
    "variant": "parallel", "iterations": 7, "batch_size": 3, "max_step_elements": 99, "lr_weight": 0.5,
    "lr_bias": 0.5, "lr_weight_scale": 0.5, "lr_act_scale": 0.5, "lr_zero_point": 0.5, "weight_deviation_limit": 2.0,
    "weight_rounding": "learned", "reconstruction": "block", "activation_drop": 0.5,
    "rounding_regularization": 0.5, "lr_rounding": 0.5, "bn_tuning": False, "bias_correction": False,
    "bias_correction_method": "per_layer", "bias_tuning": False, "bias_tuning_steps": 3, "bias_tuning_lr": 0.5,
    "bias_tuning_batch_size": 3, "bias_tuning_max_elements": 99, "size_budget": 0.5, "size_budget_unit": "bits",
    "bops_budget": 0.5, "bops_budget_unit": "absolute", "candidate_weight_bits": [4], "candidate_activation_bits": [8],
    "sensitivity_criterion": "mse", "pinned_layers": {"d": (8, None)}, "max_calibration_samples": 5,
    "cache_dtype": "float32", "max_cache_bytes": 99, "staged_propagation": False, "seed": 5, "progress": False,
    "version": 1, "quant_method": "adaquant", "checkpoint_layout": {"version": 1}, "dataset": "glue",
    "tokenizer": "bert-base-uncased", "num_samples": 5, "max_length": 5, "dataset_config_name": "sst2",
    "dataset_split": "validation", "text_column": "sentence", "calibration_batch_size": 5}
NEEDS = {"activation_drop": {"reconstruction": "block"}}  # what another field must be for the value to be valid


def test_every_field_has_one_section_and_a_test_value() -> None:
    assert sorted(AdaQuantConfig.field_names()) == sorted(OTHER_VALUE)
    assert list(AdaQuantConfig.SECTIONS) == list(SECTION_TYPES)
    for section, section_type in SECTION_TYPES.items():
        assert AdaQuantConfig.SECTIONS[section] is section_type
        for name in section_type.field_names():
            assert AdaQuantConfig.section_of(name) == section


@pytest.mark.parametrize("name", sorted(OTHER_VALUE))
def test_flat_kwargs_and_section_access_agree(name: str) -> None:
    value = OTHER_VALUE[name]
    config = AdaQuantConfig(**{name: value, **NEEDS.get(name, {})})
    section = getattr(config, AdaQuantConfig.section_of(name))
    assert getattr(config, name) == getattr(section, name) == value
    assert AdaQuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # the same config built from its section, and from a dict of the section's fields (from_dict's nested form)
    assert AdaQuantConfig(**{AdaQuantConfig.section_of(name): section}) == config
    assert AdaQuantConfig.from_dict({AdaQuantConfig.section_of(name): section.values()}) == config
    # writes go both ways, unvalidated (as on the dataclass this replaces)
    other = AdaQuantConfig()
    setattr(other, name, value)
    assert getattr(getattr(other, AdaQuantConfig.section_of(name)), name) == value


def test_sections_are_copied_not_shared() -> None:
    config = AdaQuantConfig(include=["conv*"])
    copy = config.replace(weight_bits=3)
    assert copy.scheme is not config.scheme and config.weight_bits == 4 and copy.weight_bits == 3
    copy.include.append("fc")
    assert config.include == ["conv*"]
    scheme = SchemeConfig(weight_bits=2)
    built = AdaQuantConfig(scheme=scheme, weight_bits=3)  # flat names win over a section given whole
    assert built.weight_bits == 3 and scheme.weight_bits == 2 and built.scheme is not scheme


def test_sections_validate_and_refuse_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"weight_bits must be an integer in 2..8"):
        SchemeConfig(weight_bits=9)
    with pytest.raises(ValueError, match=r"unknown SchemeConfig fields \['iterations'\]"):
        AdaQuantConfig(scheme={"iterations": 3})
    with pytest.raises(ValueError, match=r"scheme must be a SchemeConfig or a dict"):
        AdaQuantConfig(scheme=OptimizerConfig())
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'weight_bitz'"):
        AdaQuantConfig(weight_bitz=4)
    config = AdaQuantConfig()
    config.weight_bits = 1  # assignment is not validated; validate() is
    with pytest.raises(ValueError, match=r"weight_bits must be an integer in 2..8"):
        config.validate()


# config.json quantization_config written by the flat dataclass before sections (hf_adaquant 0.1.0)
OLD_CONFIG_JSON = {
    "quant_method": "adaquant", "weight_bits": 3, "activation_bits": 8, "pipeline": "advanced",
    "variant": "sequential", "first_last_bits": 8, "embedding_bits": 8, "include": ["conv*"], "exclude": None,
    "layer_bits": {"fc": [8, None]}, "weight_symmetric": False, "activation_symmetric": False,
    "weight_range_method": "mse", "activation_range_method": "mse", "iterations": 7, "batch_size": 50,
    "max_step_elements": 4194304, "lr_weight": 0.001, "lr_bias": 0.001, "lr_weight_scale": 0.001,
    "lr_act_scale": 0.01, "lr_zero_point": 0.01, "weight_deviation_limit": None, "weight_rounding": "auto",
    "reconstruction": "layer", "activation_drop": 0.0, "rounding_regularization": 0.01, "lr_rounding": 0.1,
    "bn_tuning": True, "bias_correction": True, "bias_correction_method": "single_pass", "bias_tuning": False,
    "bias_tuning_steps": 200, "bias_tuning_lr": 0.0001, "bias_tuning_batch_size": 32,
    "bias_tuning_max_elements": 268435456, "size_budget": 0.25, "size_budget_unit": "fraction",
    "bops_budget": None, "bops_budget_unit": "fraction", "candidate_weight_bits": [2, 3, 4, 8],
    "candidate_activation_bits": [4, 8], "sensitivity_criterion": "kl", "pinned_layers": {"conv1": [8, 8]},
    "max_calibration_samples": None, "cache_dtype": "float16", "max_cache_bytes": 4294967296,
    "staged_propagation": True, "seed": 0, "progress": True, "version": 1,
    "checkpoint_layout": {"version": 1, "layers": {}}, "num_samples": 128, "max_length": 128,
    "dataset_config_name": None, "dataset_split": "train", "text_column": None, "calibration_batch_size": 8,
    "dataset": "glue", "tokenizer": "bert-base-uncased"}


@pytest.mark.parametrize("cls", [AdaQuantConfig, CoreAdaQuantConfig])
def test_old_config_json_loads_and_writes_back_the_same(cls: type) -> None:
    config = cls.from_dict(json.loads(json.dumps(OLD_CONFIG_JSON)))
    assert config.layer_bits == {"fc": (8, None)} and config.optimizer.iterations == 7
    assert config.on_load.dataset == "glue" and config.saved.checkpoint_layout == {"version": 1, "layers": {}}
    assert config.to_dict() == OLD_CONFIG_JSON
    # older still: written before the newer fields existed (they take their defaults)
    older = {k: v for k, v in OLD_CONFIG_JSON.items()
             if k not in ("embedding_bits", "weight_rounding", "reconstruction", "activation_drop",
                          "rounding_regularization", "lr_rounding", "staged_propagation")}
    assert cls.from_dict(older).embedding_bits == 8 and cls.from_dict(older).reconstruction == "layer"


def test_core_config_is_the_public_one_without_transformers() -> None:
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from hf_adaquant.integrations.transformers import AdaQuantHfQuantizer

    assert issubclass(AdaQuantConfig, CoreAdaQuantConfig) and AdaQuantConfig.__name__ == CoreAdaQuantConfig.__name__
    assert issubclass(AdaQuantConfig, QuantizationConfigMixin)
    assert not issubclass(CoreAdaQuantConfig, QuantizationConfigMixin)
    core = CoreAdaQuantConfig(weight_bits=3, dataset=["text"], tokenizer="bert-base-uncased")
    public = AdaQuantConfig.from_config(core)
    assert type(public) is AdaQuantConfig and public == core and public.on_load.dataset == ["text"]
    assert AdaQuantConfig.from_config(public) is public
    assert type(AdaQuantConfig().replace(weight_bits=3)) is AdaQuantConfig
    # a config built by a core layer (a policy, a recipe) is accepted by the "adaquant" quantizer
    quantizer = AdaQuantHfQuantizer(core, pre_quantized=False)
    assert isinstance(quantizer.quantization_config, AdaQuantConfig) and quantizer.quantization_config == core
    assert dict(public) == public.to_dict()  # transformers reads configs with dict(...)


def test_configs_built_by_core_layers_are_the_public_class() -> None:
    """With hf_adaquant imported, building the core class (as policies and recipes do) gives the public one: what
    users check with isinstance and hand to transformers."""
    from hf_adaquant.policies import bert_qa_quantization_config

    policy = bert_qa_quantization_config(4, 8)
    assert type(policy) is AdaQuantConfig and type(CoreAdaQuantConfig(weight_bits=3)) is AdaQuantConfig
    assert type(CoreAdaQuantConfig.from_dict(policy.to_dict())) is AdaQuantConfig
    again = pickle.loads(pickle.dumps(policy))
    assert type(again) is AdaQuantConfig and again == policy and type(copy.deepcopy(policy)) is AdaQuantConfig
    with pytest.raises(TypeError, match="not a subclass"):
        CoreAdaQuantConfig.build_as(dict)


# Layers below serialization/integrations (tests/test_architecture.py's LAYERS): none may import transformers.
CORE_PARTS = ("utils", "quant", "config", "policies", "report", "nn", "prepare", "calibrate", "distributed",
              "adaquant", "tuning", "allocation", "quantize", "sweep", "size")


def test_core_layers_do_not_import_transformers() -> None:
    root = Path(hf_adaquant.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        part = path.relative_to(root).parts[0].removesuffix(".py")
        if part not in CORE_PARTS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):  # function-level imports too
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(root)}:{node.lineno}" for n in names
                          if n == "transformers" or n.startswith("transformers.")]
    assert not offenders, f"core modules importing transformers: {offenders}"


def test_onnxruntime_preset_sets_the_two_deployment_fields_and_keeps_the_rest() -> None:
    config = AdaQuantConfig.for_onnxruntime(weight_bits=8, activation_bits=8, iterations=7)
    assert (config.weight_symmetric, config.residual_output_bits) == (True, 8)
    assert (config.weight_bits, config.activation_bits, config.iterations) == (8, 8, 7)
    default = AdaQuantConfig()
    assert (default.weight_symmetric, default.residual_output_bits) != (True, 8)
    assert AdaQuantConfig.for_onnxruntime(residual_output_bits=None).residual_output_bits is None
    with pytest.raises(ValueError, match="residual_output_bits"):
        AdaQuantConfig.for_onnxruntime(residual_output_bits=9)
