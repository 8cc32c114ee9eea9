"""Sequential AdaQuant on the staged engine holds its activations within ``max_cache_bytes``: past the budget they
go to disk, and nothing activation-sized beyond one batch's working memory stays resident (the process's peak
RSS is measured, not the budget's own count)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator

import pytest
import torch
from tests.conftest import fast_config
from torch import nn

from hf_adaquant import prepare_model
from hf_adaquant.adaquant import run_adaquant
from hf_adaquant.adaquant.stages import find_stage_plan
from hf_adaquant.utils.memory import _DEFAULT_THRESHOLD, _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _glibc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self and glibc's mallopt")

CHANNELS, SIZE = 8, 96  # one feature map: 8 x 96 x 96 floats = 295 KB per image
IMAGES, BATCH = 1000, 50  # each stage boundary: 295 MB per model in float32 (590 MB for the FP and quantized sides)
BUDGET = 16 << 20
# Allowed growth besides the budget and the models: one batch's working memory (a block's forward on a batch holds
# a handful of feature maps: input, fake-quantized input, conv output, residual sum, the cached copy) and a margin
# for the allocator and torch's own buffers.
WORKING_MAPS = 8
MARGIN = 256 << 20


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


class _ResidualCNN(nn.Module):
    """A stem, two full-resolution residual blocks (the stages), a pooled linear head."""

    def __init__(self, c: int = CHANNELS, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.layers = nn.Sequential(*[_Block(c) for _ in range(blocks)])
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _peak_growth() -> Iterator[list[int]]:
    """Yields ``[growth]``: filled on exit with the peak resident bytes above the start (sampled every ms)."""
    start, peak, done = _resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            done.wait(0.001)

    result = [0]
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result[0] = max(peak[0], _resident_bytes()) - start


@contextlib.contextmanager
def _freed_memory_returned() -> Iterator[None]:
    """glibc maps every allocation above 8 MiB on its own and unmaps it on free, so the resident set follows what
    the engine holds rather than the heap's retention of freed blocks (that is utils/memory.py's business)."""
    libc = _glibc()
    if libc is None:
        pytest.skip("needs glibc")
    libc.mallopt(_M_MMAP_THRESHOLD, 8 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 8 << 20)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
        libc.malloc_trim(0)


def _model_bytes(*models: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in models for t in [*m.parameters(), *m.buffers()])


def test_sequential_staged_adaquant_stays_within_the_cache_budget() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(IMAGES // BATCH)]
    config = fast_config(activation_bits=8, iterations=2, batch_size=50, variant="sequential", bias_tuning_steps=0,
                         cache_dtype="float16", max_cache_bytes=BUDGET)
    prepared = prepare_model(_ResidualCNN().eval(), batches[0], config)
    names = list(prepared.plan)
    assert find_stage_plan(prepared.fp_model, names, batches[0])[0] is not None  # the staged engine runs
    feature_map = BATCH * CHANNELS * SIZE * SIZE * 4
    allowed = BUDGET + 3 * _model_bytes(prepared.qmodel) + WORKING_MAPS * feature_map + MARGIN
    with _freed_memory_returned(), _peak_growth() as growth:
        run_adaquant(prepared.qmodel, prepared.fp_model, names, batches, config)
    # Ignoring the budget (every boundary and layer cache in memory) grows it by ~3x the allowance.
    assert growth[0] <= allowed, (f"peak RSS grew by {growth[0] / 2**20:.0f} MiB during AdaQuant; allowed "
                                  f"{allowed / 2**20:.0f} MiB (budget {BUDGET >> 20} MiB + models + one batch)")
