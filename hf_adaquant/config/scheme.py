"""``SchemeConfig``: which layers are quantized, at how many bits, and how their ranges start."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..quant.ranges import RANGE_METHODS
from .checks import check_bits, check_bits_map, check_kinds, check_patterns
from .section import Section

__all__ = ["SchemeConfig"]


@dataclass
class SchemeConfig(Section):
    """Bits and policy (``config.scheme``).

    weight_bits / activation_bits: default precision (2..8; ``activation_bits=None`` keeps activations float).
    first_last_bits: precision floor of the first and last quantized layers (None: no exception).
    embedding_bits: bits per value of ``nn.Embedding`` tables, one min-max step and zero-point per row (2..8; None
    keeps them float); ``exclude`` patterns apply to embeddings too; tables tied to another layer stay float.
    include / exclude: one fnmatch pattern on layer names or a list of them. layer_bits: ``{name or pattern:
    (w, a)}`` per-layer overrides (what bit allocation produces; exact names win over patterns).
    weight_symmetric / activation_symmetric: zero-point fixed at 0.
    weight_range_method / activation_range_method: "minmax", "mean_minmax" (activations; the paper's), "mse" or
    "percentile" (range methods registered at run time are accepted too).
    residual_output_bits: opt-in (None: off). Quantize, per tensor at these bits (2..8), the output of every
    quantized conv/linear whose output reaches a residual add (ResNet blocks' last conv and shortcut convs,
    inverted-residual project convs), so that onnxruntime can run those layers on its integer kernels too
    (``QLinearConv`` needs a requantized output; its fast kernels also need 8 output bits, 8-bit inputs and weights
    that fit int8, e.g. ``weight_symmetric=True``). Models torch.fx cannot trace get none (with a warning);
    weight-only schemes (``activation_bits=None``) are refused: the integer kernels need quantized inputs.
    """

    weight_bits: int = 4
    activation_bits: int | None = 8
    first_last_bits: int | None = 8
    embedding_bits: int | None = 8
    include: list[str] | None = None
    exclude: list[str] | None = None
    layer_bits: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    weight_symmetric: bool = False
    activation_symmetric: bool = False
    weight_range_method: str = "mse"
    activation_range_method: str = "mse"
    residual_output_bits: int | None = None

    def validate(self) -> None:
        check_kinds(self, bools=("weight_symmetric", "activation_symmetric"))
        if self.weight_range_method == "mean_minmax":
            raise ValueError("weight_range_method 'mean_minmax' is for activations; use 'minmax' or 'mse'")
        methods = tuple(sorted(RANGE_METHODS))  # read now: range methods can be registered at run time
        check_kinds(self, choices={"weight_range_method": methods,
                                   "activation_range_method": methods + ("mean_minmax",)})
        check_bits("weight_bits", self.weight_bits)
        check_bits("activation_bits", self.activation_bits, allow_none=True)
        check_bits("first_last_bits", self.first_last_bits, allow_none=True)
        check_bits("embedding_bits", self.embedding_bits, allow_none=True)
        check_bits("residual_output_bits", self.residual_output_bits, allow_none=True)
        if self.residual_output_bits is not None:
            self.residual_output_bits = int(self.residual_output_bits)
            if self.activation_bits is None:
                raise ValueError("residual_output_bits needs quantized activations (activation_bits 2..8): with "
                                 "activation_bits=None the layers' inputs stay float and no integer kernel could "
                                 "use a quantized output; set residual_output_bits=None or activation_bits")
        self.include = check_patterns("include", self.include)
        self.exclude = check_patterns("exclude", self.exclude)
        self.layer_bits = check_bits_map("layer_bits", self.layer_bits)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["layer_bits"] = {k: list(v) for k, v in self.layer_bits.items()}  # JSON's form; tuples again on load
        if data["residual_output_bits"] is None:
            # off (the default): left out, so configs written without the option stay exactly as before and load
            # in versions that do not know it
            del data["residual_output_bits"]
        return data
