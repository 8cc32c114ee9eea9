"""The public ``AdaQuantConfig``: the core config plus quantize-on-load data, as a transformers quantization config.

Design: :class:`hf_adaquant.config.AdaQuantConfig` (the core layers' config: scheme, optimiser, tuning, allocation,
resources, checkpoint format) does not import transformers. This module, in the outer layer, adds

* the ``on_load`` section (:class:`QuantizeOnLoadConfig`: what ``from_pretrained(fp_dir,
  quantization_config=AdaQuantConfig(dataset=..., tokenizer=...))`` calibrates with), to every config through
  :meth:`~hf_adaquant.config.AdaQuantConfig.add_section`, so a config a core layer builds or reads back (a run's
  report, a saved ``config.json``) carries those fields too; and
* :class:`AdaQuantConfig`, the core class with transformers' ``QuantizationConfigMixin``: what ``import
  hf_adaquant`` exports and registers as quantization method "adaquant" (transformers requires the mixin). It has
  the same name, fields and behaviour; a core config handed to transformers is converted with :meth:`from_config`.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import AdaQuantConfig as CoreAdaQuantConfig
from ..config import Section
from ..config.checks import check_kinds, wrong_type

__all__ = ["AdaQuantConfig", "QuantizeOnLoadConfig"]


@dataclass
class QuantizeOnLoadConfig(Section):
    """Quantize on load (``config.on_load``): dataset (a ``datasets`` Hub name, a local json file / saved dataset
    dir, a ``datasets.Dataset`` or a list of strings / input dicts), tokenizer (object or name; text is tokenised
    with it), num_samples, max_length, dataset_config_name, dataset_split, text_column (None: "text", or "question"
    + "context", or the first string column), calibration_batch_size. In-memory data and tokenizer objects are
    not serialised (:meth:`to_dict` writes a dataset name or None, a tokenizer's name or None).
    """

    dataset: Any = None
    tokenizer: Any = None
    num_samples: int = 128
    max_length: int = 128
    dataset_config_name: str | None = None
    dataset_split: str = "train"
    text_column: str | None = None
    calibration_batch_size: int = 8

    def validate(self) -> None:
        check_kinds(self, ints={"num_samples": 1, "max_length": 1, "calibration_batch_size": 1},
                    strings={"dataset_split": False, "dataset_config_name": True, "text_column": True})
        dataset, tokenizer = self.dataset, self.tokenizer
        if not (dataset is None or isinstance(dataset, (str, os.PathLike, list, tuple))
                or hasattr(dataset, "__iter__")):
            raise wrong_type("dataset", "a dataset name or path, a list, or a datasets.Dataset, or None", dataset)
        if isinstance(tokenizer, (bool, numbers.Number, bytes, list, tuple, Mapping)):
            raise wrong_type("tokenizer", "a tokenizer object or name, or None", tokenizer)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.values().items() if k not in ("dataset", "tokenizer")}
        data["dataset"] = self.dataset if isinstance(self.dataset, str) else None
        data["tokenizer"] = (self.tokenizer if isinstance(self.tokenizer, str) or self.tokenizer is None
                             else getattr(self.tokenizer, "name_or_path", None) or None)
        return data


CoreAdaQuantConfig.add_section("on_load", QuantizeOnLoadConfig)


class AdaQuantConfig(CoreAdaQuantConfig, QuantizationConfigMixin):
    """Configuration of :func:`hf_adaquant.quantize` and of transformers' ``from_pretrained(...,
    quantization_config=...)`` (registered as "adaquant").

    Sections (each field also under its flat name: ``AdaQuantConfig(weight_bits=4)``, ``config.weight_bits``):
    ``scheme`` (:class:`~hf_adaquant.config.SchemeConfig`: bits and policy), ``optimizer``
    (:class:`~hf_adaquant.config.OptimizerConfig`: pipeline, AdaQuant), ``tuning``
    (:class:`~hf_adaquant.config.TuningConfig`), ``allocation`` (:class:`~hf_adaquant.config.AllocationConfig`:
    budgets), ``resources`` (:class:`~hf_adaquant.config.ResourcesConfig`), ``saved``
    (:class:`~hf_adaquant.config.SavedConfig`: ``quant_method``, ``checkpoint_layout``) and ``on_load``
    (:class:`QuantizeOnLoadConfig`: calibration data for quantize-on-load).
    """

    @classmethod
    def from_config(cls, config: CoreAdaQuantConfig) -> "AdaQuantConfig":
        """``config`` as this class (itself if it already is one), fields and in-memory data kept as they are."""
        return config if isinstance(config, cls) else cls(**config.sections())


# every config built from now on, by core modules too (policies, recipes), is this class
CoreAdaQuantConfig.build_as(AdaQuantConfig)
