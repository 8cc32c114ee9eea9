"""Verbosity and progress bars of hf_adaquant, following the Hugging Face libraries' switches.

Progress bars are ``huggingface_hub``'s ``tqdm`` in the group ``"hf_adaquant"``: ``HF_HUB_DISABLE_PROGRESS_BARS=1``,
``huggingface_hub.utils.disable_progress_bars()`` (all groups) or :func:`disable_progress_bars` (ours only) turn
them off.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from huggingface_hub.utils import disable_progress_bars as _hub_disable
from huggingface_hub.utils import enable_progress_bars as _hub_enable
from huggingface_hub.utils import tqdm as _hub_tqdm

__all__ = ["PROGRESS_GROUP", "disable_progress_bars", "enable_progress_bars", "get_verbosity", "progress_bar",
           "set_verbosity"]

PROGRESS_GROUP = "hf_adaquant"
_ROOT = "hf_adaquant"


def set_verbosity(level: int | str) -> None:
    """Log level of every ``hf_adaquant.*`` logger, e.g. ``set_verbosity("INFO")`` or ``logging.WARNING``
    (as ``transformers.logging.set_verbosity``)."""
    logging.getLogger(_ROOT).setLevel(level.upper() if isinstance(level, str) else level)


def get_verbosity() -> int:
    """The effective log level of the ``hf_adaquant`` loggers."""
    return logging.getLogger(_ROOT).getEffectiveLevel()


def disable_progress_bars() -> None:
    """Hide hf_adaquant's progress bars (other libraries' are left as they are)."""
    _hub_disable(PROGRESS_GROUP)


def enable_progress_bars() -> None:
    """Show hf_adaquant's progress bars again (unless ``HF_HUB_DISABLE_PROGRESS_BARS`` is set)."""
    _hub_enable(PROGRESS_GROUP)


def progress_bar(iterable: Iterable[Any] | None = None, *, disable: bool = False, **kwargs: Any) -> _hub_tqdm:
    """A ``tqdm`` bar that the Hugging Face switches above can turn off; ``disable=True`` always hides it."""
    return _hub_tqdm(iterable, disable=disable, name=PROGRESS_GROUP, **kwargs)
