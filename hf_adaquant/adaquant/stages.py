"""Stages of a forward pass for O(depth) calibration: the stem, a chain of repeated blocks, the head.

A model is cut at its repeated blocks (the children of ``nn.Sequential`` / ``nn.ModuleList`` containers that hold
quantized layers: timm ``blocks.*`` / ``layerN.*`` / ``stages.*``, transformers ``encoder.layer.*`` /
``model.layers.*``, the CIFAR ResNets' ``layerN.*``). The cut is kept only if one traced forward (two samples of
the first batch, hooks with keyword arguments) proves it is a *chain*:

* every block and every quantized layer runs exactly once, blocks one after the other;
* each block's inputs are the previous block's output (or its first element) plus values shared with the first
  block (attention masks, position ids or embeddings: the *same objects*) and plain constants (None, flags);
* every quantized layer runs inside its own block, before the first block (stem) or after the last one (head);
* with quantized layers in the head: the model's output computed from the last block's output alone (every block
  skipped) equals the real one.

Then a block can be replayed alone on its recorded inputs, and the stage boundary (the current block's inputs)
carries everything later stages need. Nested containers give several cuts; the finest that is a chain wins
(torchvision MobileNet-V2's inner ``conv`` Sequentials fail, its ``features.*`` pass). No chain: the caller
falls back to whole-model captures and logs :attr:`StagePlan.reason`-style messages from :func:`find_stage_plan`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..utils.batches import Batch, batch_size, call_model, slice_batch
from ..utils.hooks import hooks
from ..utils.modules import eval_mode

__all__ = ["StagePlan", "candidate_cuts", "find_stage_plan", "skip_blocks"]

_logger = logging.getLogger(__name__)
_PRIMITIVES = (type(None), bool, int, float, str)
_MAX_CUTS = 4
Key = int | str  # a positional index or a keyword name


@dataclass
class StagePlan:
    """A verified cut: ``blocks`` in execution order and where every quantized layer runs.

    ``stage_of[layer]`` is -1 (stem), ``i`` (inside ``blocks[i]``) or ``len(blocks)`` (head). ``templates[i]``
    (``i >= 1``) rebuilds block ``i``'s ``(args, kwargs)``: each entry is ``("chain", "same" | "first")`` (the
    previous block's output, or its element 0), ``("ref", key)`` (block 0's input ``key``) or ``("const", v)``.
    """

    blocks: list[str]
    stage_of: dict[str, int]
    templates: list[tuple[list[tuple], dict[str, tuple]] | None] = field(default_factory=list)

    @property
    def head(self) -> int:
        return len(self.blocks)

    def shared_keys(self) -> set[Key]:
        """Block 0's inputs that later blocks reuse (kept for the whole run)."""
        return {spec[1] for t in self.templates if t is not None for spec in [*t[0], *t[1].values()]
                if spec[0] == "ref"}


def _owns(block: str, name: str) -> bool:
    return name.startswith(block + ".")


def candidate_cuts(model: nn.Module, layer_names: Sequence[str]) -> list[list[str]]:
    """Cuts of the module tree into blocks holding quantized layers, finest first (at most a few)."""
    layers = set(layer_names)
    blocks: set[str] = set()
    for cname, container in model.named_modules():
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        for child, _ in container.named_children():
            full = f"{cname}.{child}" if cname else child
            if full not in layers and any(_owns(full, l) for l in layer_names):
                blocks.add(full)
    depth = {b: sum(_owns(o, b) for o in blocks) for b in blocks}  # block ancestors of b
    cuts: list[list[str]] = []
    for d in sorted(set(depth.values()), reverse=True):
        cut = sorted(b for b in blocks if depth[b] == d or (depth[b] < d and not any(
            _owns(b, o) and depth[o] <= d for o in blocks)))
        if cut and cut not in cuts:
            cuts.append(cut)
    return cuts[:_MAX_CUTS]


@contextmanager
def skip_blocks(model: nn.Module, blocks: Sequence[str], output: Any) -> Iterator[None]:
    """Within the context, each of ``blocks`` returns ``output`` without running (its hooks still run)."""
    saved = []
    for name in blocks:
        module = model.get_submodule(name)
        saved.append((module, module.__dict__.get("forward")))  # an instance forward (accelerate hooks) is kept
        module.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        for module, own in saved:
            if own is None:
                del module.forward
            else:
                module.forward = own


def _items(args: tuple, kwargs: dict) -> list[tuple[Key, Any]]:
    return [*enumerate(args), *kwargs.items()]


def _replayable(value: Any) -> bool:
    leaves = pytree.tree_leaves(value)
    return all(isinstance(v, (torch.Tensor, *_PRIMITIVES)) for v in leaves)


def _link(value: Any, previous: Any) -> str | None:
    if value is previous:
        return "same"
    if isinstance(previous, (tuple, list)) and len(previous) and value is previous[0]:
        return "first"
    try:  # transformers ModelOutput: a dict that also indexes by position
        if not isinstance(previous, torch.Tensor) and hasattr(previous, "to_tuple") and value is previous[0]:
            return "first"
    except (IndexError, KeyError, TypeError):
        pass
    return None


def _template(i: int, blocks: Sequence[str], inputs: list[tuple[tuple, dict]], outputs: list[Any]) -> tuple:
    """Block ``i``'s input template, or raise ``ValueError`` saying why it is not a chain link."""
    first = {id(v): key for key, v in _items(*inputs[0]) if not isinstance(v, _PRIMITIVES)}
    args, kwargs = inputs[i]
    specs: dict[Key, tuple] = {}
    chains = 0
    for key, value in _items(args, kwargs):
        link = _link(value, outputs[i - 1])
        if link is not None:
            specs[key], chains = ("chain", link), chains + 1
        elif isinstance(value, _PRIMITIVES):
            specs[key] = ("const", value)
        elif id(value) in first and _replayable(value):
            specs[key] = ("ref", first[id(value)])
        else:
            raise ValueError(f"input {key!r} of block {blocks[i]!r} ({type(value).__name__}) is neither the output "
                             f"of block {blocks[i - 1]!r} nor shared with block {blocks[0]!r}")
    if chains != 1:
        raise ValueError(f"block {blocks[i]!r} does not take the output of block {blocks[i - 1]!r} as an input")
    return [specs[k] for k in range(len(args))], {k: specs[k] for k in kwargs}


def _tensors(obj: Any) -> list[torch.Tensor] | None:
    """The tensors of a model output (tensor, mapping, tuple, list); None if it holds anything else."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, _PRIMITIVES):
        return []
    items = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else None
    if items is None:
        return None
    out: list[torch.Tensor] = []
    for item in items:
        sub = _tensors(item)
        if sub is None:
            return None
        out += sub
    return out


def _same_output(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    if ta is None or tb is None or not ta or len(ta) != len(tb):
        return False
    return all(x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
               for x, y in zip(ta, tb))


@torch.no_grad()
def _check_cut(model: nn.Module, blocks: list[str], layer_names: Sequence[str], batch: Batch) -> StagePlan:
    """Trace one forward with hooks and build the plan of this cut, or raise ``ValueError`` saying why not."""
    events: list[tuple[str, str]] = []
    inputs: dict[str, tuple[tuple, dict]] = {}
    outputs: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def on_start(name: str, args: tuple, kwargs: dict) -> None:
        events.append(("start", name))
        counts[name] = counts.get(name, 0) + 1
        inputs[name] = (args, kwargs)

    def on_end(name: str, out: Any) -> None:
        events.append(("end", name))
        outputs[name] = out

    def on_layer(name: str) -> None:
        events.append(("layer", name))
        counts[name] = counts.get(name, 0) + 1

    starts = [(model.get_submodule(b), lambda m, a, k, b=b: on_start(b, a, k)) for b in blocks]
    ends = [(model.get_submodule(b), lambda m, a, o, b=b: on_end(b, o)) for b in blocks]
    layers = [(model.get_submodule(name), lambda m, a, n=name: on_layer(n)) for name in layer_names]
    with hooks(starts, "pre", with_kwargs=True), hooks(ends), hooks(layers, "pre"):
        final = call_model(model, batch)
    for name in [*blocks, *layer_names]:
        if counts.get(name, 0) != 1:
            raise ValueError(f"{name!r} runs {counts.get(name, 0)} times in one forward pass (a chain needs once)")
    order = [name for kind, name in events if kind == "start"]
    stage_of: dict[str, int] = {}
    current, done = -1, 0  # block running now (-1: none), blocks finished
    for kind, name in events:
        if kind == "start":
            if current != -1:
                raise ValueError(f"block {name!r} runs inside block {order[current]!r}")
            current = order.index(name)
        elif kind == "end":
            current, done = -1, done + 1
        elif current != -1:
            if not _owns(order[current], name):
                raise ValueError(f"layer {name!r} runs inside block {order[current]!r} but is not part of it")
            stage_of[name] = current
        elif done == 0:
            stage_of[name] = -1
        elif done == len(order):
            stage_of[name] = len(order)
        else:
            raise ValueError(f"layer {name!r} runs between blocks {order[done - 1]!r} and {order[done]!r}")
    ins = [inputs[b] for b in order]
    outs = [outputs[b] for b in order]
    for key, value in _items(*ins[0]):
        if not _replayable(value):
            hint = " (a KV cache: put use_cache=False in the calibration batches)" if "Cache" in type(
                value).__name__ else ""
            raise ValueError(f"block {order[0]!r} takes input {key!r} of type {type(value).__name__}, which cannot "
                             f"be replayed (only tensors and plain values can){hint}")
    if not _replayable(outs[-1]):
        raise ValueError(f"block {order[-1]!r} returns a {type(outs[-1]).__name__}, which cannot be stored")
    templates = [None] + [_template(i, order, ins, outs) for i in range(1, len(order))]
    plan = StagePlan(order, stage_of, templates)
    if any(s == plan.head for s in stage_of.values()):
        with skip_blocks(model, order, outs[-1]):
            skipped = call_model(model, batch)
        if not _same_output(skipped, final):
            raise ValueError("the model's output depends on more than the last block's output (skipping the "
                             "blocks changes it)")
    return plan


def find_stage_plan(model: nn.Module, layer_names: Sequence[str], batch: Batch) -> tuple[StagePlan | None, str]:
    """The finest verified cut of ``model`` (eval mode) for ``layer_names``, or ``(None, why not)``.

    The layers must come in stage order (stem, blocks in execution order, head), as the sequential variant
    optimises them.
    """
    cuts = candidate_cuts(model, layer_names)
    if not cuts:
        return None, "no nn.Sequential / nn.ModuleList container holds blocks of quantized layers"
    sample = slice_batch(batch, 0, min(2, batch_size(batch)))
    reasons = []
    with eval_mode(model):
        for blocks in cuts:
            try:
                plan = _check_cut(model, blocks, layer_names, sample)
            except ValueError as e:
                reasons.append(f"cut at {blocks[0]!r}.. ({len(blocks)} blocks): {e}")
                continue
            except Exception as e:  # the whole-model capture then reports a model error with its batch
                reasons.append(f"tracing one forward pass failed ({type(e).__name__}: {e})")
                break
            stages = [plan.stage_of[n] for n in layer_names]
            if stages != sorted(stages):
                reasons.append(f"cut at {blocks[0]!r}..: the layers are not listed in stage order")
                continue
            return plan, ""
    return None, "; ".join(reasons)
