"""Pure-python parts of the peer benchmark: settings, same-time iteration counts, our reference rows, tables.

Standard library only, so the tests run without the peers' virtual environments.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "format_markdown",
    "iterations_for_time",
    "merge_row",
    "ours_rows",
    "parse_setting",
    "save_rows",
]

ROW_KEY = ("peer", "model", "setting", "budget")


def parse_setting(setting: str) -> tuple[int, int]:
    """``"W4A8"`` -> ``(4, 8)``.

    Raises:
        ValueError: Naming the setting, when it is not of the form ``W<bits>A<bits>``.
    """
    text = setting.strip().upper()
    if not text.startswith("W") or text.count("A") != 1:
        raise ValueError(f"setting {setting!r} is not of the form W<bits>A<bits> (e.g. W4A8)")
    w, a = text[1:].split("A")
    if not (w.isdigit() and a.isdigit()) or not (1 <= int(w) <= 16 and 1 <= int(a) <= 16):
        raise ValueError(f"setting {setting!r}: weight and activation bits must be integers in 1..16")
    return int(w), int(a)


def iterations_for_time(target_seconds: float, probes: Sequence[tuple[int, float]], minimum: int = 1,
                        maximum: int = 100_000) -> int:
    """Iterations per layer whose run takes about ``target_seconds``, from timed probe runs.

    A run costs ``fixed + per_iteration * iterations`` (range calibration, BN folding and data passes do not
    depend on the iteration count). Two or more probes at different counts give both terms by least squares;
    a single probe is taken as all per-iteration cost (an upper bound on it, so the count errs low).

    Args:
        target_seconds: The time to match (our pipeline's calibration time).
        probes: ``(iterations, seconds)`` of short runs of the peer.
        minimum: Smallest count returned (when even the fixed cost exceeds the target).
        maximum: Largest count returned.

    Raises:
        ValueError: Without probes, with a non-positive target, or when the probes give no positive
            per-iteration cost (e.g. all at the same count, or timing noise larger than the slope).
    """
    if target_seconds <= 0:
        raise ValueError(f"target_seconds must be > 0, got {target_seconds}")
    if not probes:
        raise ValueError("iterations_for_time needs at least one (iterations, seconds) probe")
    if any(n <= 0 or t <= 0 for n, t in probes):
        raise ValueError(f"probes must have positive iterations and seconds, got {list(probes)}")
    if len(probes) == 1:
        fixed, slope = 0.0, probes[0][1] / probes[0][0]
    else:
        xs, ys = [float(n) for n, _ in probes], [t for _, t in probes]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:
            raise ValueError(f"probes need at least two different iteration counts, got {list(probes)}")
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        fixed = max(0.0, my - slope * mx)
    if slope <= 0:
        raise ValueError(f"probes {list(probes)} give no positive time per iteration; use counts further apart")
    return int(min(maximum, max(minimum, math.floor((target_seconds - fixed) / slope))))


def merge_row(rows: list[dict], row: dict) -> list[dict]:
    """``rows`` with ``row`` replacing an earlier row of the same (peer, model, setting, budget)."""
    key = tuple(row.get(k) for k in ROW_KEY)
    return [r for r in rows if tuple(r.get(k) for k in ROW_KEY) != key] + [row]


def ours_rows(results_dir: Path, models: Iterable[str], settings: Iterable[str], method: str = "advanced",
              repo_root: Path | None = None, tags: Sequence[str] = ("",)) -> list[dict]:
    """Our pipeline's measured rows from ``core_<model><tag>.json`` (bench_core results; not re-run).

    ``tags`` selects result files of bench_core runs with ``--tag`` (e.g. the reconstruction ablation's
    ``_abl_layer``, ``_abl_block``); each row is labelled with the options that distinguish it (reconstruction,
    activation drop, rounding). Each row keeps its source file and the commit it was measured at. A missing file
    or row is skipped (the table then shows only the peers for that cell).
    """
    out = []
    settings = [s.upper() for s in settings]
    for model in models:
        for tag in tags:
            path = Path(results_dir) / f"core_{model}{tag}.json"
            if not path.exists():
                continue
            for r in json.loads(path.read_text()):
                if r.get("method") != method or r.get("setting", "").upper() not in settings or "top1" not in r:
                    continue
                config = r.get("config") or {}
                source = path.relative_to(repo_root).as_posix() if repo_root else path.name
                out.append({
                    "peer": "hf_adaquant", "method": f"{method} pipeline{_variant(config)}", "model": model,
                    "setting": r["setting"], "budget": "reference", "top1": r["top1"], "seconds": r.get("seconds"),
                    "iterations": config.get("iterations"), "eval_images": 10000,
                    "range_method": "weights {}, activations {}".format(
                        config.get("weight_range_method", "?"), config.get("activation_range_method", "?")),
                    "threads": _threads(r),
                    "load_average_1min": r.get("load_average_1min"), "commit": r.get("commit", "unknown"),
                    "source": source,
                })
    return out


def _threads(row: dict) -> int | str:
    """The row's thread count: recorded by bench_core since 0a483de, before that in its run profile (if any)."""
    if "threads" in row:
        return row["threads"]
    profiled = ((row.get("profile") or {}).get("throughput") or {}).get("threads")
    # older bench_core rows without a profile do not record it; its --threads default is 2.
    return profiled if profiled is not None else "2 (bench_core default, not recorded)"


def _variant(config: dict) -> str:
    """`` (block + drop 0.5, learned rounding)``: the options of a row that differ from the default pipeline."""
    parts = []
    if config.get("reconstruction", "layer") != "layer":
        drop = config.get("activation_drop") or 0.0
        parts.append(config["reconstruction"] + (f" + drop {drop:g}" if drop else ""))
    elif "reconstruction" in config:
        parts.append("layer")
    if config.get("weight_rounding", "auto") != "auto":
        parts.append(f"{config['weight_rounding']} rounding")
    if config.get("seed"):
        parts.append(f"seed {config['seed']}")
    return f" ({', '.join(parts)})" if parts else ""


def _cell(value: object, fmt: str = "{}") -> str:
    if value is None or value == "":
        return "—"
    return fmt.format(value) if not isinstance(value, str) else value


def format_markdown(rows: list[dict], title: str) -> str:
    """A markdown table, one line per row, sorted by model, setting, then ours first."""
    order = {"hf_adaquant": 0, "aimet": 1, "brevitas": 2}
    rows = sorted(rows, key=lambda r: (r.get("model", ""), r.get("setting", ""), order.get(r.get("peer"), 9),
                                       r.get("budget", "")))
    lines = [
        f"# {title}", "",
        "| model | setting | method | budget | iterations/layer | range method | top-1 | eval images | "
        "PTQ s | threads | load 1 min | version | commit | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        load = r.get("load_average_1min")
        lines.append("| " + " | ".join([
            _cell(r.get("model")), _cell(r.get("setting")),
            _cell(f"{r.get('peer')}: {r.get('method', '')}".rstrip(": ")), _cell(r.get("budget")),
            _cell(r.get("iterations")), _cell(r.get("range_method")),
            _cell(r.get("top1"), "{:.2f}"), _cell(r.get("eval_images")),
            _cell(r.get("seconds"), "{:.1f}"), _cell(r.get("threads")),
            _cell(load, "{:.2f}"), _cell(r.get("peer_version")), _cell(r.get("commit")),
            _cell(r.get("source", "this run")),
        ]) + " |")
    return "\n".join(lines) + "\n"


def save_rows(rows: list[dict], json_path: Path, title: str) -> None:
    """Write ``rows`` to ``json_path`` and the table beside it (``.md``), each atomically."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((json_path, json.dumps(rows, indent=2)),
                       (json_path.with_suffix(".md"), format_markdown(rows, title))):
        tmp = path.with_name(path.name + ".tmp")  # an interrupted write never leaves a truncated file
        tmp.write_text(text)
        tmp.replace(path)
