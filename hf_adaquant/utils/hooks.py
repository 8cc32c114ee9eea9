"""Forward hooks that are always removed: register, run, remove, as one ``with`` block.

Every pass that observes or edits layer outputs (range calibration, bias correction, BN tuning, layer tracing,
activation sizing) registers hooks on some modules, runs the model and must remove the hooks even when the model
raises; otherwise a later forward pass runs a stale hook (a silently wrong model, not an error).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Literal

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["hooks"]

HookKind = Literal["forward", "pre"]


@contextmanager
def hooks(pairs: Iterable[tuple[nn.Module, Callable[..., Any]]], kind: HookKind = "forward", *,
          with_kwargs: bool = False) -> Iterator[list[RemovableHandle]]:
    """Register ``fn`` on each ``(module, fn)`` of ``pairs`` for the ``with`` block; always removed on exit.

    Args:
        pairs: modules and their hook functions (the same module may appear more than once).
        kind: ``"forward"`` (``fn(module, args, output)``, :meth:`~torch.nn.Module.register_forward_hook`) or
            ``"pre"`` (``fn(module, args)``, :meth:`~torch.nn.Module.register_forward_pre_hook`).
        with_kwargs: pass the call's keyword arguments too (``fn(module, args, kwargs[, output])``).

    Yields:
        The handles, in the order of ``pairs``.

    Example:
        >>> with hooks((m, record) for m in model.modules() if isinstance(m, nn.Linear)):
        ...     model(x)
    """
    if kind not in ("forward", "pre"):
        raise ValueError(f"hooks(kind=...) must be 'forward' or 'pre', got {kind!r}")
    handles: list[RemovableHandle] = []
    try:
        # registered inside the try: a failure half-way (a bad module in pairs) still removes the ones made
        for module, fn in pairs:
            if kind == "forward":
                handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
            else:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
        yield handles
    finally:
        for handle in handles:
            handle.remove()
