"""Renamed keyword arguments keep working for a while, with a ``FutureWarning`` that names the new one."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

__all__ = ["renamed_kwargs"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_kwargs(**renames: str) -> Callable[[F], F]:
    """Accept ``old=`` for each ``old="new"`` pair, warn, and pass the value on as ``new=``.

    Raises:
        TypeError: both the old and the new name were given.

    Example:
        >>> @renamed_kwargs(split="dataset_split")
        ... def load(name, dataset_split="train"): ...
    """

    def decorator(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{func.__qualname__}() got both {old!r} (deprecated) and {new!r}; pass {new!r}")
                # stacklevel 2: the warning points at the caller's line, not at this wrapper
                warnings.warn(f"{func.__qualname__}(): {old!r} is deprecated and will be removed; use {new!r}",
                              FutureWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator
