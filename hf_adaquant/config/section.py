"""``Section``: the base of the small dataclasses an ``AdaQuantConfig`` is composed of."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

__all__ = ["Section"]


@dataclasses.dataclass
class Section:
    """One group of config fields. Subclasses are dataclasses whose :meth:`validate` checks every field by name
    (raising ``ValueError`` naming it) and normalises accepted forms in place.

    Attribute assignment does not validate (as on the flat config: tests and callers set fields, then
    :meth:`AdaQuantConfig.validate` or ``replace`` checks); building a section does.
    """

    NON_NEGATIVE_FLOATS: ClassVar[tuple[str, ...]] = ()
    """Real-valued fields >= 0 (text front ends convert ``"1e-3"`` strings for these and the next)."""
    POSITIVE_OPTIONAL_FLOATS: ClassVar[tuple[str, ...]] = ()
    """Real-valued fields > 0, or None."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` on a bad field; normalise accepted forms."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def values(self) -> dict[str, Any]:
        """The fields as they are (no copy, no conversion)."""
        return {name: getattr(self, name) for name in self.field_names()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy of the fields (sections with non-JSON values override this)."""
        return {name: copy.deepcopy(value) for name, value in self.values().items()}
