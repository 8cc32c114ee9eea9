"""reuse_freed_memory: large freed blocks stay in the heap while quantizing, and go back to the system after."""

from __future__ import annotations

import ctypes

import pytest
import torch

from hf_adaquant.utils import memory
from hf_adaquant.utils.memory import reuse_freed_memory

libc = memory._glibc()
pytestmark = pytest.mark.skipif(libc is None or not hasattr(libc, "mallinfo2"),
                                reason="glibc >= 2.33 (mallinfo2) needed to observe the heap")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap() -> _MallInfo2:
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


MIB = 1 << 20


def _alloc_and_free(mib: int) -> None:
    t = torch.empty(mib * MIB // 4)
    t.fill_(1.0)
    del t


def _mapped_while_alive(mib: int | None = None) -> int:
    """How much more memory glibc holds in ``mmap``-ed blocks while a tensor is alive.

    Measured on the mappings rather than on the heap's free list, which depends on what earlier tests left in the
    heap. ``mib=None``: 64 MiB more than the heap has free, so that no free chunk can serve it (glibc reuses a
    fitting free chunk whatever its thresholds): it is mapped exactly when the mmap threshold is below its size.
    """
    size = _heap().fordblks + 64 * MIB if mib is None else mib * MIB
    mapped = _heap().hblkhd
    t = torch.empty(size // 4)
    t.fill_(1.0)
    grown = _heap().hblkhd - mapped
    del t
    return grown


def test_large_blocks_are_reused_inside_and_the_defaults_are_back_after() -> None:
    assert _mapped_while_alive() >= 64 * MIB  # outside: glibc maps it (and unmaps it on free)
    with reuse_freed_memory():
        assert _mapped_while_alive(64) < 16 * MIB  # inside: served from the heap, kept there after the free
        mapped = _heap().hblkhd
        _alloc_and_free(64)
        assert _heap().hblkhd == mapped
    assert _mapped_while_alive() >= 64 * MIB  # the defaults are back


def test_nested_uses_restore_only_at_the_outermost() -> None:
    with reuse_freed_memory():
        with reuse_freed_memory():
            pass
        assert _mapped_while_alive(64) < 16 * MIB  # the inner exit did not restore the defaults
    assert _mapped_while_alive() >= 64 * MIB


def test_quantize_runs_inside_it(monkeypatch) -> None:
    """quantize() holds the setting for its whole run (every phase allocates large tensors)."""
    from torch import nn

    from hf_adaquant import AdaQuantConfig, quantize

    seen = []
    real = memory._glibc

    def spy() -> object:
        seen.append(memory._depth)
        return real()

    monkeypatch.setattr(memory, "_glibc", spy)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    quantize(model, [torch.randn(4, 3, 8, 8)], AdaQuantConfig(pipeline="light", progress=False))
    assert seen == [0] and memory._depth == 0
