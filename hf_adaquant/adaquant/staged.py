"""Staged propagation: per-layer calibration captures in O(depth) forward work (Hubara et al.'s sequential variant).

The whole-model capture re-runs the quantized and the FP prefix for every layer: forward work grows with the
square of the depth. :class:`StagedRunner` keeps the activations at the current stage boundary of a
:class:`~hf_adaquant.adaquant.stages.StagePlan` for both models (one structure per calibration batch, exact, in
memory within the run's :class:`~hf_adaquant.adaquant.spill.CacheBudget`, spilled past it) and:

* a layer in the stem is captured as before (the forward stops at the layer, so only the stem runs);
* a layer inside block ``i`` is captured by running block ``i`` alone on the boundary, stopping at the layer;
* a layer in the head is captured by running the model with every block skipped (each returns the last block's
  stored output), so only the stem and the head run;
* once the layers of a block are done (the caller optimised them in place), both boundaries advance by running
  the block once.

The inputs a layer sees are exactly those of a whole-model forward of the quantized model as optimised so far,
and its targets those of the FP model. Layers must be asked for in stage order; layers already finished (a
resumed work dir) are simply passed over.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..utils.batches import Batch, CalibrationBatchError
from ..utils.hooks import hooks
from .capture import StopForward, capture_with, model_calls
from .iocache import IOCache, NonFiniteActivationError
from .spill import CacheBudget, SpillDir, TreeStore
from .stages import StagePlan, find_stage_plan, skip_blocks

__all__ = ["StagedRunner"]


def _device(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device


class _Side:
    """One model (quantized or FP) and its boundary: block 0's inputs and the last run block's outputs."""

    def __init__(self, model: nn.Module, label: str, budget: CacheBudget, spill: SpillDir) -> None:
        self.model, self.label = model, label
        self.budget, self.spill = budget, spill
        self.first = TreeStore(budget, spill, f"{label} inputs of the first block")
        self.previous: TreeStore | None = None  # outputs of block ``position - 1``

    def store(self, what: str) -> TreeStore:
        return TreeStore(self.budget, self.spill, f"{self.label} {what}")

    def clear(self) -> None:
        self.first.clear()
        if self.previous is not None:
            self.previous.clear()


class StagedRunner:
    """Captures ``(quantized input, FP output)`` of each layer of ``plan``, advancing stage by stage.

    Use as a context manager (or call :meth:`close`): boundary memory and spill files are freed on exit.
    """

    def __init__(self, plan: StagePlan, qmodel: nn.Module, fp_model: nn.Module | None, batches: Sequence[Batch],
                 *, dtype: torch.dtype, budget: CacheBudget, spill: SpillDir) -> None:
        self.plan, self.batches = plan, list(batches)
        self.dtype, self.budget, self.spill = dtype, budget, spill
        self.q = _Side(qmodel, "quantized", budget, spill)
        # Without an FP model only the quantized side advances (observe() only; bias correction).
        self.fp = _Side(fp_model, "FP", budget, spill) if fp_model is not None else None
        self.sides = [s for s in (self.q, self.fp) if s is not None]
        self.position: int | None = None  # boundary = inputs of this block (None: the stem has not run yet)
        self._fp_ahead: tuple[int, TreeStore] | None = None  # FP outputs of the current block, computed early
        self._modes = [(s.model, s.model.training) for s in self.sides]
        self._owns_spill = False
        for side in self.sides:
            side.model.eval()

    @classmethod
    def for_model(cls, qmodel: nn.Module, fp_model: nn.Module | None, layer_names: Sequence[str],
                  batches: Sequence[Batch], *, max_bytes: int, dtype: torch.dtype = torch.float32,
                  plan_model: nn.Module | None = None) -> tuple["StagedRunner | None", str]:
        """A runner with its own budget and spill directory (both freed by :meth:`close`), or ``(None, why)``.

        The stages are found on ``plan_model`` (default: ``fp_model`` or ``qmodel``), which must have the same
        module tree.
        """
        plan, why = find_stage_plan(plan_model or fp_model or qmodel, layer_names, batches[0])
        if plan is None:
            return None, why
        runner = cls(plan, qmodel, fp_model, batches, dtype=dtype, budget=CacheBudget(max_bytes), spill=SpillDir())
        runner._owns_spill = True
        return runner, ""

    def __enter__(self) -> "StagedRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for side in self.sides:
            side.clear()
        if self._fp_ahead is not None:
            self._fp_ahead[1].clear()
            self._fp_ahead = None
        if self._owns_spill:
            self.spill.close()
        for model, training in self._modes:
            model.train(training)

    # ------------------------------------------------------------------------------------------ boundaries

    def _block_inputs(self, side: _Side, i: int, index: int) -> tuple[tuple, dict]:
        device = _device(side.model)
        if i == 0:
            return side.first.get(index, device)
        args_spec, kwargs_spec = self.plan.templates[i]
        previous = side.previous.get(index, device)
        shared = side.first.get(index, device)

        def value(spec: tuple) -> Any:
            if spec[0] == "chain":
                return previous if spec[1] == "same" else previous[0]
            if spec[0] == "ref":
                key = spec[1]
                return shared[0][key] if isinstance(key, int) else shared[1][key]
            return spec[1]

        return tuple(value(s) for s in args_spec), {k: value(s) for k, s in kwargs_spec.items()}

    def _block_calls(self, side: _Side, i: int) -> list[Callable[[], Any]]:
        block = side.model.get_submodule(self.plan.blocks[i])

        def call(index: int) -> Any:
            args, kwargs = self._block_inputs(side, i, index)
            try:
                return block(*args, **kwargs)
            except (StopForward, NonFiniteActivationError, CalibrationBatchError):
                raise
            except (MemoryError, torch.cuda.OutOfMemoryError, OSError) as exc:
                exc.add_note(f"while running block {self.plan.blocks[i]!r} on calibration batch {index}")
                raise
            except Exception as exc:
                raise CalibrationBatchError(index, exc) from exc

        return [lambda index=index: call(index) for index in range(len(self.batches))]

    def _head_calls(self, side: _Side) -> list[Callable[[], Any]]:
        calls = model_calls(side.model, self.batches)

        def call(index: int) -> Any:
            with skip_blocks(side.model, self.plan.blocks, side.previous.get(index, _device(side.model))):
                return calls[index]()

        return [lambda index=index: call(index) for index in range(len(self.batches))]

    @torch.no_grad()
    def _run_stem(self, side: _Side) -> None:
        first = side.model.get_submodule(self.plan.blocks[0])

        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            side.first.put(index, (args, kwargs))
            raise StopForward

        with hooks([(first, keep)], "pre", with_kwargs=True):
            for index, call in enumerate(model_calls(side.model, self.batches)):
                try:
                    call()
                except StopForward:
                    continue
                raise RuntimeError(f"block {self.plan.blocks[0]!r} did not run during the forward pass")

    @torch.no_grad()
    def _compute_block(self, side: _Side, i: int) -> TreeStore:
        outputs = side.store(f"outputs of block {self.plan.blocks[i]!r}")
        try:
            for index, call in enumerate(self._block_calls(side, i)):
                outputs.put(index, call())
        except BaseException:
            outputs.clear()
            raise
        return outputs

    def _run_block(self, side: _Side, i: int) -> None:
        ahead = self._fp_ahead
        if side is self.fp and ahead is not None and ahead[0] == i:  # computed already by fp_block_outputs()
            outputs, self._fp_ahead = ahead[1], None
        else:
            outputs = self._compute_block(side, i)
        if side.previous is not None:
            side.previous.clear()
        side.previous = outputs
        if i == 0:
            self._keep_shared(side)

    def _keep_shared(self, side: _Side) -> None:
        """Later blocks reuse only some of block 0's inputs (masks, position ids): drop the rest once it ran."""
        keys = self.plan.shared_keys()
        kept = side.store("inputs of the first block shared by later blocks")
        for index in range(len(self.batches)):
            args, kwargs = side.first.get(index)
            kept.put(index, ([a if k in keys else None for k, a in enumerate(args)],
                             {k: v for k, v in kwargs.items() if k in keys}))
        side.first.clear()
        side.first = kept

    def advance_to(self, stage: int) -> None:
        """Move both boundaries forward to the inputs of stage ``stage`` (a block index, or the head)."""
        if stage < 0:
            return
        if self.position is None:
            for side in self.sides:
                self._run_stem(side)
            self.position = 0
        while self.position < min(stage, self.plan.head):
            for side in self.sides:
                self._run_block(side, self.position)
            self.position += 1

    # ------------------------------------------------------------------------------ block reconstruction

    def _at_block(self, i: int) -> None:
        if not 0 <= i < self.plan.head:
            raise ValueError(f"stage {i} is not a block (blocks 0..{self.plan.head - 1})")
        self.advance_to(i)
        if self.position != i:
            raise RuntimeError(f"block {self.plan.blocks[i]!r} is already passed: blocks must come in order")

    def block_inputs(self, i: int, index: int, device: torch.device | None = None) -> tuple[tuple, dict]:
        """Block ``i``'s ``(args, kwargs)`` on calibration batch ``index`` in the quantized model (as optimised
        so far); the boundaries advance to block ``i`` first. Fresh tensors: the caller may modify them."""
        self._at_block(i)
        args, kwargs = self._block_inputs(self.q, i, index)
        if device is not None:
            args, kwargs = pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v,
                                           (args, kwargs))
        return args, kwargs

    def fp_block_outputs(self, i: int) -> TreeStore:
        """Block ``i``'s outputs in the FP model, one structure per batch (block reconstruction's targets).

        Computed once: advancing past block ``i`` reuses them as the FP boundary instead of running it again.
        """
        if self.fp is None:
            raise RuntimeError("fp_block_outputs() needs a runner with an FP model")
        self._at_block(i)
        if self._fp_ahead is None or self._fp_ahead[0] != i:
            self._fp_ahead = (i, self._compute_block(self.fp, i))
        return self._fp_ahead[1]

    # -------------------------------------------------------------------------------------------- captures

    def capture(self, name: str) -> IOCache:
        """The layer's inputs in the quantized model (as optimised so far) and outputs in the FP model.

        Without an FP model, inputs and outputs both come from ``qmodel`` in one pass (the parallel variant's
        capture, e.g. of a float model).
        """
        stage = self._enter(name)
        cache = IOCache(self.dtype, name=name, budget=self.budget, spill=self.spill)
        try:
            if self.fp is None:
                self._capture_side(self.q, name, stage, cache.x.append, cache.y.append)
            else:
                self._capture_side(self.q, name, stage, cache.x.append, None)
                self._capture_side(self.fp, name, stage, None, cache.y.append)
            return cache.finalize()
        except BaseException:
            cache.cleanup()
            raise

    def observe(self, name: str, on_output: Callable[[torch.Tensor], None], quantized: bool = True) -> None:
        """Call ``on_output`` with the layer's output on every batch (quantized or FP model), in stage order."""
        stage = self._enter(name)
        self._capture_side(self.q if quantized else self.fp, name, stage, None, on_output)

    def _enter(self, name: str) -> int:
        stage = self.plan.stage_of[name]
        if self.position is not None and stage < self.position:
            raise RuntimeError(f"layer {name!r} is in a stage already passed: layers must come in stage order")
        self.advance_to(stage)
        return stage

    @torch.no_grad()
    def _capture_side(self, side: _Side, name: str, stage: int, on_input, on_output) -> None:
        if stage < 0:
            calls = model_calls(side.model, self.batches)
        elif stage == self.plan.head:
            calls = self._head_calls(side)
        else:
            calls = self._block_calls(side, stage)
        capture_with(side.model.get_submodule(name), name, calls, on_input, on_output)
