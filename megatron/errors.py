"""Errors of the run configuration, shared by :mod:`megatron.config` and the objectives.

They live below both packages: :mod:`megatron.config` looks objectives up in the registry to
parse the ``objective:`` section, and an objective's ``Config`` raises :class:`SectionError` from
its own checks, so neither package can import the other for them.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """Invalid run configuration; ``problems`` lists every problem found, one line each.

    Each problem reads ``FILE: dotted.path: message`` (``FILE`` is the YAML file that supplied the
    key, ``<override>`` for a command-line override, ``<config>`` for values nobody set).
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'' if count == 1 else 's'} in the run configuration:"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


class SectionError(ConfigError):
    """A section's own checks failed; ``fields`` holds ``(field name, message)`` pairs."""

    def __init__(self, section: str, fields: list[tuple[str, str]]) -> None:
        self.fields = list(fields)
        super().__init__([f"{section}.{name}: {message}" for name, message in self.fields])


class FieldChecks:
    """Collects a section's field problems (``__post_init__`` checks), then raises them together
    as one :class:`SectionError`."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.fields: list[tuple[str, str]] = []

    def fail(self, name: str, message: str) -> None:
        self.fields.append((name, message))

    def at_least(self, name: str, low: float) -> bool:
        value = getattr(self.obj, name)
        if value is not None and value < low:
            self.fail(name, f"must be >= {low} (got {value})")
            return False
        return True

    def positive(self, name: str) -> bool:
        value = getattr(self.obj, name)
        if value is not None and not value > 0:
            self.fail(name, f"must be > 0 (got {value})")
            return False
        return True

    def fraction(self, name: str, *, closed_high: bool = False, open_low: bool = False) -> None:
        value = getattr(self.obj, name)
        if value is None:
            return
        low_ok = value > 0 if open_low else value >= 0
        high_ok = value <= 1 if closed_high else value < 1
        if not (low_ok and high_ok):
            interval = f"{'(' if open_low else '['}0, 1{']' if closed_high else ')'}"
            self.fail(name, f"must be in {interval} (got {value})")

    def done(self) -> None:
        if self.fields:
            raise SectionError(type(self.obj).__name__, self.fields)
