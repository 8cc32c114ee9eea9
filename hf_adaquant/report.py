"""The record of a quantization run, attached to the returned model as ``hf_adaquant_report``.

A plain dataclass with no dependencies: the pipeline writes it, serialization and the integrations read it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["QuantizationReport"]


@dataclass
class QuantizationReport:
    """What a :func:`hf_adaquant.quantize` run did, attached to the returned model as ``hf_adaquant_report``."""

    config: dict
    plan: dict[str, list]
    layers: list[dict] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    bias_tuning_kl: tuple[float, float] | None = None
    bn_tuned_layers: list[str] = field(default_factory=list)
    allocation: dict | None = None  # Allocation.to_dict() when the bits came from a size/BOPs budget
    folded_batchnorms: dict[str, str] = field(default_factory=dict)  # BN name -> conv (to rebuild checkpoints)
    profile: dict | None = None  # RunProfile.to_dict() when the run ran inside hf_adaquant.utils.profiling.profiling()

    def to_dict(self) -> dict:
        return asdict(self)
