"""Plots of bit allocations: accuracy vs size of a budget sweep (:func:`hf_adaquant.sweep.pareto_sweep`), bits per
layer of one allocation. matplotlib (a ``dev`` extra) is imported only when plotting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils.files import atomic_path
from .budget import allocation_to_layer_bits, bits_of_option
from .ilp import Allocation, BitOption

__all__ = ["plot_bits_per_layer", "plot_pareto"]


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------


def _save(fig: Any, path: str | os.PathLike) -> None:
    """Write ``fig`` atomically; the format comes from ``path``'s extension (the temporary name has none)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")


def _figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot, no global backend change)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or the 'dev' extra: "
                          "pip install 'hf-adaquant[dev]')") from exc
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, ylabel: str = "top-1 (%)",
                title: str | None = None) -> None:
    """Metric vs weight size (fraction of FP32): the mixed-precision curve, the uniform points and FP (PNG)."""
    fig = _figure((6.4, 4.4))
    ax = fig.add_subplot()
    mixed = sorted((r["size_fraction"], r["metric"], r["budget"]) for r in rows if "metric" in r)
    if mixed:
        ax.plot([m[0] for m in mixed], [m[1] for m in mixed], "o-", color="tab:blue", label="mixed precision (IP)")
    uniform = {r["uniform"]["option"]: r["uniform"] for r in rows if r.get("uniform")}
    if uniform:
        ax.scatter([u["size_fraction"] for u in uniform.values()], [u["metric"] for u in uniform.values()],
                   marker="s", color="tab:orange", label="best uniform of <= size", zorder=3)
        for label, u in uniform.items():
            ax.annotate(label, (u["size_fraction"], u["metric"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=8)
    fp = next((r["fp_metric"] for r in rows if r.get("fp_metric") is not None), None)
    if fp is not None:
        ax.axhline(fp, color="gray", linestyle="--", label=f"FP32 ({fp:.2f})")
    ax.set_xlabel("weight size (fraction of FP32)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _assignment_bits(allocation: Allocation | Mapping[str, Any]) -> dict[str, tuple[int, int | None]]:
    if isinstance(allocation, Allocation):
        return allocation_to_layer_bits(allocation)
    data = allocation.get("assignment", allocation) if isinstance(allocation, Mapping) else allocation
    out: dict[str, tuple[int, int | None]] = {}
    for name, value in data.items():
        if isinstance(value, BitOption):
            out[name] = bits_of_option(value)
        elif isinstance(value, Mapping):
            out[name] = bits_of_option(BitOption.from_dict(value))
        else:
            out[name] = (int(value[0]), None if value[1] is None else int(value[1]))
    return out


def plot_bits_per_layer(allocation: Allocation | Mapping[str, Any], path: str | os.PathLike, *,
                        title: str | None = None) -> None:
    """Bar chart of weight and activation bits per layer (PNG).

    ``allocation``: an :class:`Allocation`, its ``to_dict()``, or ``{layer: (w, a)}`` such as ``config.layer_bits``.
    Float activations get no activation bar.
    """
    bits = _assignment_bits(allocation)
    names = list(bits)
    fig = _figure((max(6.0, 0.28 * len(names) + 2.0), 4.2))
    ax = fig.add_subplot()
    xs = list(range(len(names)))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [bits[n][0] for n in names], width, label="weight bits", color="tab:blue")
    abits = [bits[n][1] for n in names]
    if any(a is not None for a in abits):
        ax.bar([x + width / 2 for x, a in zip(xs, abits) if a is not None], [a for a in abits if a is not None],
               width, label="activation bits", color="tab:orange")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("bits")
    ax.set_yticks([2, 3, 4, 5, 6, 7, 8])
    ax.set_ylim(0, 9.8)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    fig.tight_layout()
    _save(fig, path)
