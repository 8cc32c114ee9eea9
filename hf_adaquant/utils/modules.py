"""Module-tree edits shared by preparation, BN folding, sensitivity measurement and checkpoint loading."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["eval_mode", "set_submodule"]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the existing submodule ``name`` (dotted path, e.g. ``"layer1.0.conv1"``) of ``model`` by ``new``.

    torch's :meth:`~torch.nn.Module.set_submodule` (called through ``nn.Module`` so a model class that overrides
    it does not change the behaviour); the submodule must exist, so a misspelt name raises instead of adding one.

    Raises:
        AttributeError: ``name`` (or its parent) is not a submodule of ``model``.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(getattr(parent, child, None), nn.Module):
        raise AttributeError(f"{type(model).__name__} has no submodule {name!r} to replace")
    nn.Module.set_submodule(model, name, new)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the ``with`` block; its training flags are restored on exit (exception or not)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
