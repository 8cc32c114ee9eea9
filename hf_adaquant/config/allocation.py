"""``AllocationConfig``: mixed-precision bit allocation under a size and/or BOPs budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .checks import check_bits, check_bits_map, check_kinds, wrong_type
from .section import Section

__all__ = ["AllocationConfig"]


@dataclass
class AllocationConfig(Section):
    """Bit allocation by integer programming, active when a budget is set (``config.allocation``).

    size_budget (+ size_budget_unit "fraction" of FP32 weight size, "bits" or "bytes") and/or bops_budget (+
    bops_budget_unit "fraction" of FP32 BOPs or "absolute"). candidate_weight_bits x candidate_activation_bits are
    the per-layer options; sensitivity_criterion "kl" or "mse" (label-free, against the FP outputs) or "task" (needs
    labels); pinned_layers fixes some layers' ``(w, a)``. A budget and ``layer_bits`` exclude each other (checked by
    the whole config); the allocation's result is a config with layer_bits and no budget.
    """

    POSITIVE_OPTIONAL_FLOATS: ClassVar[tuple[str, ...]] = ("size_budget", "bops_budget")

    size_budget: float | None = None
    size_budget_unit: str = "fraction"
    bops_budget: float | None = None
    bops_budget_unit: str = "fraction"
    candidate_weight_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    candidate_activation_bits: list[int] = field(default_factory=lambda: [4, 8])
    sensitivity_criterion: str = "kl"
    pinned_layers: dict[str, tuple[int, int | None]] = field(default_factory=dict)

    @property
    def has_budget(self) -> bool:
        return self.size_budget is not None or self.bops_budget is not None

    def validate(self) -> None:
        check_kinds(self, positive_optional=self.POSITIVE_OPTIONAL_FLOATS,
                    choices={"size_budget_unit": ("fraction", "bits", "bytes"),
                             "bops_budget_unit": ("fraction", "absolute"),
                             "sensitivity_criterion": ("kl", "mse", "task")})
        self.pinned_layers = check_bits_map("pinned_layers", self.pinned_layers)
        for name in ("candidate_weight_bits", "candidate_activation_bits"):
            values = getattr(self, name)
            if isinstance(values, tuple):
                values = list(values)
            if not isinstance(values, list):
                raise wrong_type(name, "a list of bit-widths", values)
            if not values:
                raise ValueError(f"{name} must list at least one bit-width")
            for bits in values:
                check_bits(name, bits)
            setattr(self, name, [int(bits) for bits in values])

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["pinned_layers"] = {k: list(v) for k, v in self.pinned_layers.items()}
        return data
