"""scripts/bench_core.save_row merges rows under a filelock: concurrent writers keep each other's rows."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import pytest


@pytest.fixture()
def bench_core(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_core.py"
    spec = importlib.util.spec_from_file_location("bench_core_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    return module


def test_concurrent_save_row_keeps_every_row(bench_core, tmp_path):
    rows = [{"method": f"m{i}", "setting": "W4A8", "top1": 50.0 + i, "seconds": 1.0, "peak_rss_mib": 10.0}
            for i in range(8)]
    threads = [threading.Thread(target=bench_core.save_row, args=("tiny", row)) for row in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saved = json.loads((tmp_path / "results" / "core_tiny.json").read_text())
    assert sorted(r["method"] for r in saved) == [f"m{i}" for i in range(8)]
    assert all(r["metrics"]["accuracy"] == round(r["top1"] / 100, 6) for r in saved)
    bench_core.save_row("tiny", {**rows[0], "top1": 99.0})  # the same (method, setting) replaces its row
    saved = json.loads((tmp_path / "results" / "core_tiny.json").read_text())
    assert len(saved) == 8 and [r["top1"] for r in saved if r["method"] == "m0"] == [99.0]
