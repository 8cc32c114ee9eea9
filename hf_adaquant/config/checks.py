"""Field checks shared by the config sections: each raises ``ValueError`` naming the field, what it must be and
what it got, and returns the value in its normal form (numpy integers as ``int``, one pattern as a list...)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from ..quant.quantizer import MAX_BITS, MIN_BITS

__all__ = ["check_bits", "check_bits_map", "check_int", "check_kinds", "check_number", "check_patterns",
           "is_int", "wrong_type"]


def wrong_type(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None, allow_none: bool = False) -> int | None:
    """``value`` as a Python int (numpy integers accepted; bools, floats and strings are not)."""
    if value is None and allow_none:
        return None
    bound = "" if minimum is None else f" >= {minimum}"
    expected = f"an integer{bound}{' or None' if allow_none else ''}"
    if not is_int(value):
        raise wrong_type(name, expected, value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, strictly_positive: bool, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    expected = f"a finite number {'> 0' if strictly_positive else '>= 0'}{' or None' if allow_none else ''}"
    if isinstance(value, str):  # e.g. YAML 1.1 reads 1e-3 (no dot) as a string
        raise ValueError(f"{name} must be {expected}, got the string {value!r}; pass a number (1e-3, not '1e-3')")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise wrong_type(name, expected, value)
    if not math.isfinite(value) or value < 0 or (strictly_positive and value == 0):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_bits(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not is_int(value) or not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}"
                         f"{' or None' if allow_none else ''}, got {value!r}")


def check_patterns(name: str, value: Any) -> list[str] | None:
    """A list of fnmatch patterns; one pattern string is a one-pattern list (a string is not iterated)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise wrong_type(name, "a layer-name pattern or a list of them (strings), or None", value)
    return list(value)


def check_bits_map(name: str, value: Any) -> dict[str, tuple[int, int | None]]:
    """``{layer name or pattern: (weight_bits, activation_bits)}`` with tuple values."""
    if not isinstance(value, Mapping):
        raise wrong_type(name, "a dict {layer name: (weight_bits, activation_bits)}", value)
    out = {}
    for key, bits in value.items():
        if not isinstance(key, str):
            raise wrong_type(f"{name} key", "a layer name or pattern (string)", key)
        if not isinstance(bits, (tuple, list)) or len(bits) != 2:
            raise ValueError(f"{name}[{key!r}] must be (weight_bits, activation_bits), got {bits!r}")
        check_bits(f"{name}[{key!r}] weight bits", bits[0])
        check_bits(f"{name}[{key!r}] activation bits", bits[1], allow_none=True)
        out[key] = (int(bits[0]), None if bits[1] is None else int(bits[1]))
    return out


def check_kinds(section: Any, *, ints: Mapping[str, int | None] = {}, optional_ints: Mapping[str, int] = {},
                non_negative: Iterable[str] = (), positive_optional: Iterable[str] = (), bools: Iterable[str] = (),
                choices: Mapping[str, tuple[str, ...]] = {}, strings: Mapping[str, bool] = {}) -> None:
    """Check (and normalise in place) the fields of ``section`` by kind, each kind a table of field names.

    ints / optional_ints: ``{name: minimum}`` (None: no minimum); non_negative: finite floats >= 0;
    positive_optional: finite floats > 0 or None; bools: True/False only; choices: ``{name: accepted values}``;
    strings: ``{name: None allowed}``.
    """
    for name, minimum in ints.items():
        setattr(section, name, check_int(name, getattr(section, name), minimum))
    for name, minimum in optional_ints.items():
        setattr(section, name, check_int(name, getattr(section, name), minimum, allow_none=True))
    for name in non_negative:
        check_number(name, getattr(section, name), strictly_positive=False)
    for name in positive_optional:
        check_number(name, getattr(section, name), strictly_positive=True, allow_none=True)
    for name in bools:
        if not isinstance(getattr(section, name), bool):
            raise wrong_type(name, "True or False", getattr(section, name))
    for name, accepted in choices.items():
        if getattr(section, name) not in accepted:
            raise ValueError(f"{name} must be one of {list(accepted)}, got {getattr(section, name)!r}")
    for name, optional in strings.items():
        value = getattr(section, name)
        if not isinstance(value, str) and not (optional and value is None):
            raise wrong_type(name, "a string" + (" or None" if optional else ""), value)
