"""``AdaQuantConfig``: every choice of a quantization run, composed of sections, validated on build.

The config is a set of small sections (:class:`SchemeConfig` bits and policy, :class:`OptimizerConfig` the
AdaQuant optimiser, :class:`TuningConfig`, :class:`AllocationConfig`, :class:`ResourcesConfig` and
:class:`SavedConfig` the checkpoint format), reached as ``config.scheme``, ``config.optimizer``... Every field
also reads and writes under its flat name (``config.weight_bits`` is ``config.scheme.weight_bits``), and the
constructor, :meth:`replace`, :meth:`to_dict` and :meth:`from_dict` speak the flat names: the form of every
``config.json`` and recipe written so far.

This class does not know transformers. The quantize-on-load fields (``dataset``, ``tokenizer``...) are a section
that :mod:`hf_adaquant.integrations.transformers_config` adds with :meth:`AdaQuantConfig.add_section` (importing
``hf_adaquant`` does it), next to the ``QuantizationConfigMixin`` subclass that is the public
``hf_adaquant.AdaQuantConfig``. The core layers build and read this class; both are accepted wherever a config is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Iterator

from .allocation import AllocationConfig
from .optimizer import OptimizerConfig
from .resources import ResourcesConfig
from .saved import SavedConfig
from .scheme import SchemeConfig
from .section import Section
from .tuning import TuningConfig

__all__ = ["AdaQuantConfig"]


def _proxy(section: str, name: str) -> property:
    """The flat attribute ``name`` of the config: ``config.<section>.<name>``, read and written (unvalidated)."""

    def get(self: "AdaQuantConfig") -> Any:
        return getattr(getattr(self, section), name)

    def set_(self: "AdaQuantConfig", value: Any) -> None:
        setattr(getattr(self, section), name, value)

    return property(get, set_, doc=f"``config.{section}.{name}``")


class AdaQuantConfig:
    """Configuration of :func:`hf_adaquant.quantize`: the sections below, fields also under their flat names.

    ``AdaQuantConfig(weight_bits=4, iterations=50)`` and ``AdaQuantConfig(scheme=SchemeConfig(weight_bits=4),
    optimizer={"iterations": 50})`` build the same config (flat names win over a section given whole). Building
    validates every field (``ValueError`` naming it); assigning an attribute does not (:meth:`validate` or
    :meth:`replace` does). See each section for its fields.
    """

    SECTIONS: ClassVar[dict[str, type[Section]]] = {
        "scheme": SchemeConfig, "optimizer": OptimizerConfig, "tuning": TuningConfig,
        "allocation": AllocationConfig, "resources": ResourcesConfig, "saved": SavedConfig}
    _FIELD_SECTION: ClassVar[dict[str, str]] = {}  # flat field name -> section name
    # The class that building this one gives (set by the transformers integration to its public subclass), so a
    # config built by a core module (a policy, a recipe) is the ``hf_adaquant.AdaQuantConfig`` users check for.
    _built_as: ClassVar[type | None] = None

    scheme: SchemeConfig
    optimizer: OptimizerConfig
    tuning: TuningConfig
    allocation: AllocationConfig
    resources: ResourcesConfig
    saved: SavedConfig

    # ------------------------------------------------------------------------------------------- sections

    @classmethod
    def add_section(cls, name: str, section_type: type[Section]) -> None:
        """Add a section to every config (its fields become flat names too); re-adding a name replaces it (module
        reloads). Outer layers use it for fields the core does not read (quantize-on-load data)."""
        owner = AdaQuantConfig  # one table for the class and its subclasses
        table = owner._FIELD_SECTION
        clashes = sorted(n for n in section_type.field_names()
                         if table.get(n, name) != name or (n not in table and hasattr(owner, n)))
        if name not in owner.SECTIONS and hasattr(owner, name):
            clashes.append(name)
        if clashes:
            raise ValueError(f"section {name!r} clashes with existing config names: {clashes}")
        owner.SECTIONS[name] = section_type
        for field_name in section_type.field_names():
            owner._FIELD_SECTION[field_name] = name
            setattr(owner, field_name, _proxy(name, field_name))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every flat field name, section by section."""
        return tuple(cls._FIELD_SECTION)

    @classmethod
    def section_of(cls, field_name: str) -> str:
        """The section holding ``field_name`` (``KeyError`` for an unknown name)."""
        return cls._FIELD_SECTION[field_name]

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a section added after this config was built gets its defaults.
        if name in AdaQuantConfig.SECTIONS and not name.startswith("__"):
            section = AdaQuantConfig.SECTIONS[name]()
            self.__dict__[name] = section
            return section
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def sections(self) -> dict[str, Section]:
        """``{section name: section}`` (the config's own objects, not copies)."""
        return {name: getattr(self, name) for name in AdaQuantConfig.SECTIONS}

    # ------------------------------------------------------------------------------------------- building

    def __new__(cls, **fields: Any) -> "AdaQuantConfig":
        target = AdaQuantConfig._built_as if cls is AdaQuantConfig and AdaQuantConfig._built_as else cls
        return object.__new__(target)

    @classmethod
    def build_as(cls, public: type) -> None:
        """Make ``AdaQuantConfig(...)`` build ``public`` (a subclass) from now on."""
        if not issubclass(public, AdaQuantConfig):
            raise TypeError(f"{public.__name__} is not a subclass of AdaQuantConfig")
        AdaQuantConfig._built_as = public

    def __init__(self, **fields: Any) -> None:
        given = {name: fields.pop(name) for name in list(fields) if name in AdaQuantConfig.SECTIONS}
        for key in fields:
            if key not in AdaQuantConfig._FIELD_SECTION:
                raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument {key!r}")
        for name, section_type in AdaQuantConfig.SECTIONS.items():
            values = self._section_values(name, section_type, given.get(name))
            values.update({k: v for k, v in fields.items() if AdaQuantConfig._FIELD_SECTION[k] == name})
            self.__dict__[name] = section_type(**values)  # each section validates itself
        self._check_across_sections()

    @staticmethod
    def _section_values(name: str, section_type: type[Section], value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if isinstance(value, section_type):
            return value.values()  # shallow, as dataclasses.replace: validation makes fresh containers
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(section_type.field_names()))
            if unknown:
                raise ValueError(f"unknown {section_type.__name__} fields {unknown}; accepted: "
                                 f"{sorted(section_type.field_names())}")
            return dict(value)
        raise ValueError(f"{name} must be a {section_type.__name__} or a dict of its fields, got "
                         f"{type(value).__name__} {value!r}")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, what it must be and what it got; normalise accepted forms.

        Every field is type-checked (integers are not bools, floats accept integers, enums list their values); a
        single ``include``/``exclude`` pattern string becomes a one-pattern list and lists of bits become tuples,
        so that the config reads the same whichever way it was written.
        """
        for section in self.sections().values():
            section.validate()
        self._check_across_sections()

    def _check_across_sections(self) -> None:
        # A budget is solved into per-layer bits; layer_bits would override every layer it names, so the budget
        # would silently not hold. A saved checkpoint's config records a finished run: older versions stored the
        # budget next to the layer_bits it produced, and those must still load.
        if self.allocation.has_budget and self.scheme.layer_bits and self.saved.checkpoint_layout is None:
            budgets = [n for n in ("size_budget", "bops_budget") if getattr(self.allocation, n) is not None]
            raise ValueError(f"{' and '.join(budgets)} cannot be combined with layer_bits: layer_bits fixes the "
                             "bits of the layers it names, so the budget would be ignored. To fix some layers "
                             "inside a budget use pinned_layers={name: (weight_bits, activation_bits)}; "
                             "otherwise drop the budget or layer_bits")

    @property
    def has_budget(self) -> bool:
        return self.allocation.has_budget

    def replace(self, **changes: Any) -> "AdaQuantConfig":
        """A validated copy (same class) with some fields, or whole sections, changed."""
        return type(self)(**{**self.sections(), **changes})

    @classmethod
    def for_onnxruntime(cls, **fields: Any) -> "AdaQuantConfig":
        """A config whose exported ONNX file runs on onnxruntime's integer kernels wherever the scheme allows.

        Two settings differ from the defaults (``fields`` may override either, and set any other field):
        ``weight_symmetric=True`` (its int8 convolution kernels take weights with zero-point 0; per-channel
        asymmetric 8-bit weights run in float) and ``residual_output_bits=8`` (an output quantizer on each conv
        whose output reaches a residual add, so that conv is requantized and fused too). Measured at W8A8, batch 8,
        2 threads (BENCHMARKS.md §5): timm resnet50 2.19x and EfficientNet-Lite0 1.81x faster than FP32
        onnxruntime, against 0.84x / 0.62x with the defaults.
        """
        return cls(**{"weight_symmetric": True, "residual_output_bits": 8, **fields})

    # ---------------------------------------------------------------------------------------- flat dicts

    def to_dict(self) -> dict[str, Any]:
        """Every field under its flat name, JSON-serialisable (sections convert what JSON cannot hold)."""
        data: dict[str, Any] = {}
        for section in self.sections().values():
            data.update(section.to_dict())
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], return_unused_kwargs: bool = False,
                  **kwargs: Any) -> "AdaQuantConfig" | tuple["AdaQuantConfig", dict[str, Any]]:
        """Inverse of :meth:`to_dict`; ``kwargs`` naming fields override (transformers' calling convention).
        Section names may hold a dict of that section's fields."""
        known = set(AdaQuantConfig._FIELD_SECTION) | set(AdaQuantConfig.SECTIONS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdaQuantConfig fields {unknown}; accepted: {sorted(cls.field_names())}")
        data = dict(data)
        for name in ("layer_bits", "pinned_layers"):  # null in JSON; lists become tuples in validate()
            if name in data and data[name] is None:
                data[name] = {}
        data.update({k: v for k, v in kwargs.items() if k in known})
        config = cls(**data)
        if return_unused_kwargs:
            return config, {k: v for k, v in kwargs.items() if k not in known}
        return config

    # ------------------------------------------------------------------------------------------ protocol

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AdaQuantConfig):
            return NotImplemented
        return self.sections() == other.sections()

    __hash__ = None  # type: ignore[assignment]  (mutable, as the dataclass it replaces)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for section in self.sections().values() for k, v in section.values().items())
        return f"{type(self).__name__}({fields})"

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        """``dict(config)`` is :meth:`to_dict` (transformers calls it on quantization configs)."""
        yield from self.to_dict().items()


for _name, _type in list(AdaQuantConfig.SECTIONS.items()):
    AdaQuantConfig.add_section(_name, _type)
