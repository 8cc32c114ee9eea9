"""The run configuration: :class:`AdaQuantConfig` and its sections, and which fields each stage reads.

``hf_adaquant.config`` does not import transformers: the ``QuantizationConfigMixin`` subclass users import as
``hf_adaquant.AdaQuantConfig`` and the quantize-on-load fields live in
:mod:`hf_adaquant.integrations.transformers_config` (see :mod:`hf_adaquant.config.composed`).
"""

from .allocation import AllocationConfig
from .composed import AdaQuantConfig
from .optimizer import PIPELINES, RECONSTRUCTIONS, VARIANTS, OptimizerConfig
from .resources import ResourcesConfig
from .saved import CONFIG_VERSION, QUANT_METHOD, SavedConfig
from .scheme import SchemeConfig
from .section import Section
from .stages import StageFields
from .tuning import BIAS_CORRECTION_METHODS, TuningConfig

_CORE_SECTIONS = (SchemeConfig, OptimizerConfig, TuningConfig, AllocationConfig, ResourcesConfig, SavedConfig)
NON_NEGATIVE_FLOAT_FIELDS: tuple[str, ...] = tuple(n for s in _CORE_SECTIONS for n in s.NON_NEGATIVE_FLOATS)
POSITIVE_OPTIONAL_FLOAT_FIELDS: tuple[str, ...] = tuple(n for s in _CORE_SECTIONS for n in s.POSITIVE_OPTIONAL_FLOATS)
FLOAT_FIELDS = NON_NEGATIVE_FLOAT_FIELDS + POSITIVE_OPTIONAL_FLOAT_FIELDS
"""Fields holding real numbers: text front ends (recipes, ``--set``) convert ``"1e-3"`` strings for these."""

__all__ = ["AdaQuantConfig", "AllocationConfig", "BIAS_CORRECTION_METHODS", "CONFIG_VERSION", "FLOAT_FIELDS",
           "NON_NEGATIVE_FLOAT_FIELDS", "OptimizerConfig", "PIPELINES", "POSITIVE_OPTIONAL_FLOAT_FIELDS",
           "QUANT_METHOD", "RECONSTRUCTIONS", "ResourcesConfig", "SavedConfig", "SchemeConfig", "Section",
           "StageFields", "TuningConfig", "VARIANTS"]
