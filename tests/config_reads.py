"""Test helper: record which config fields code reads (through the flat names every module uses)."""

from __future__ import annotations

import pytest

from hf_adaquant.config import AdaQuantConfig as CoreAdaQuantConfig


def record_config_reads(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Patch every flat field property of the config (core class: the public subclass inherits them) to add its name
    to the returned set when read. Clear the set to start a new recording."""
    reads: set[str] = set()
    for name in CoreAdaQuantConfig.field_names():
        original = CoreAdaQuantConfig.__dict__[name]

        def get(self, _name=name, _original=original):
            reads.add(_name)
            return _original.fget(self)

        monkeypatch.setattr(CoreAdaQuantConfig, name, property(get, original.fset, doc=original.__doc__))
    return reads
