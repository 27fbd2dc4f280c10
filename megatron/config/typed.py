"""Typed values from merged YAML: conversion to each field's type, and the problems found.

:class:`Converter` turns the merged YAML tree of :mod:`megatron.config.loader` into the keyword
arguments of the config dataclasses, recording every problem in :class:`Problems` (each line
``FILE: dotted.path: message``, blamed on the file that set the key) instead of raising, so the
loader reports them all at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from megatron.config.sections import SECTIONS, ObjectiveSection, is_derived
from megatron.errors import SectionError
from megatron.objectives.registry import get_objective, objective_names

UNSET = "<config>"
"""The origin of a key nobody set (a default)."""
BAD = object()
"""Marks a value that failed conversion (its problem is already recorded)."""
_PATH_RE = re.compile(r"\b([a-z_]+(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])+)")
_LAST_PART_RE = re.compile(r"(\.[^.\[]+|\[\d+\])$")


class Problems:
    """Problems found so far, with the origin (file) of every key that was set."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.sources: dict[str, str] = {}

    def origin(self, path: str) -> str:
        """The file (or ``<override>``) that supplied ``path``; ``<config>`` if nobody set it.

        Keys inside list items are blamed on whoever set the list (lists replace whole).
        """
        while path:
            if path in self.sources:
                return self.sources[path]
            if "[" not in path:
                break
            path = _LAST_PART_RE.sub("", path)
        return UNSET

    def at(self, path: str, message: str, origin: str | None = None) -> None:
        self.lines.append(f"{origin or self.origin(path)}: {path}: {message}")

    def rule(self, message: str) -> None:
        """A cross-section message; blamed on the origin of the first dotted path it names."""
        match = _PATH_RE.search(message)
        origin = UNSET
        if match and match.group(1).split(".")[0] in SECTIONS:
            origin = self.origin(match.group(1))
        self.lines.append(f"{origin}: {message}")


def describe_value(value: Any) -> str:
    kinds = {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "list",
        dict: "mapping",
    }
    if value is None:
        return "null"
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{kinds.get(type(value), type(value).__name__)} {text}"


def describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(describe_type(a) for a in rest) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin is list:
        return f"a list of {describe_type(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    names = {
        bool: "a boolean (true or false)",
        int: "an integer",
        float: "a number",
        str: "a string",
    }
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def did_you_mean(word: str, choices: Iterable[str], *, list_all: bool = False) -> str:
    """``; did you mean 'x'?`` for the closest choice (or, with ``list_all``, all choices)."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid keys: {', '.join(choices)}" if list_all else ""


class Converter:
    """Converts merged YAML values to typed field values, recording problems instead of raising."""

    def __init__(self, problems: Problems, resolved: bool) -> None:
        self.problems = problems
        self.resolved = resolved

    def value(self, value: Any, hint: Any, path: str, shown: Any = None) -> Any:
        """``value`` converted to ``hint``, or ``BAD`` after recording a problem.

        ``shown`` is the type named in messages (the full ``X | None`` while converting ``X``).
        """
        shown = shown or hint
        origin = typing.get_origin(hint)
        if hint is Any:
            return value
        if origin in (typing.Union, types.UnionType):
            args = typing.get_args(hint)
            if value is None and type(None) in args:
                return None
            rest = [a for a in args if a is not type(None)]
            if len(rest) == 1 and value is not None:
                return self.value(value, rest[0], path, shown=hint)
            return self._expected(hint, value, path)
        if origin is Literal:
            return self._literal(value, hint, path)
        if origin is list:
            if not isinstance(value, list):
                return self._expected(shown, value, path)
            (item_hint,) = typing.get_args(hint)
            items = [self.value(v, item_hint, f"{path}[{i}]") for i, v in enumerate(value)]
            return BAD if any(v is BAD for v in items) else items
        if dataclasses.is_dataclass(hint):
            kwargs = self.fields(value, hint, path)
            return BAD if kwargs is None else self.build(hint, kwargs, path)
        return self._scalar(value, hint, path, shown)

    def _expected(self, hint: Any, value: Any, path: str) -> Any:
        self.problems.at(path, f"expected {describe_type(hint)}, got {describe_value(value)}")
        return BAD

    def _literal(self, value: Any, hint: Any, path: str) -> Any:
        choices = typing.get_args(hint)
        # Literal[0, 1] must not accept True/False (bool is an int subclass).
        if any(type(value) is type(c) and value == c for c in choices):
            return value
        message = (
            f"must be one of {', '.join(repr(c) for c in choices)} (got {describe_value(value)})"
        )
        if isinstance(value, str):
            message += did_you_mean(value, [c for c in choices if isinstance(c, str)])
        self.problems.at(path, message)
        return BAD

    def _scalar(self, value: Any, hint: Any, path: str, shown: Any) -> Any:
        if hint is bool and isinstance(value, bool):
            return value
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint is str and isinstance(value, str):
            return value
        if hint is float and not isinstance(value, bool):
            number: float | None = None
            if isinstance(value, int | float):
                number = float(value)
            elif isinstance(value, str):
                # PyYAML (YAML 1.1) reads 1e-5 as a string; accept numeric strings here.
                try:
                    number = float(value.strip())
                except ValueError:
                    number = None
            if number is not None:
                if not math.isfinite(number):
                    self.problems.at(path, f"must be a finite number (got {value!r})")
                    return BAD
                return number
        return self._expected(shown, value, path)

    def fields(
        self, raw: Any, cls: type, path: str, *, also_known: Sequence[str] = (), owner: str = ""
    ) -> dict[str, Any] | None:
        """Typed keyword arguments for ``cls`` from mapping ``raw``; ``None`` if any was bad.

        ``also_known`` are keys handled by the caller (offered by did-you-mean); ``owner`` is
        appended to unknown-key messages.
        """
        if raw is None:  # an empty section (``logging:``) reads as null
            raw = {}
        if not isinstance(raw, dict):
            self.problems.at(path, f"expected a mapping, got {describe_value(raw)}")
            return None
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        ok = True
        for key, value in raw.items():
            sub = f"{path}.{key}"
            if key not in known:
                choices = [*known, *also_known]
                hint = did_you_mean(key, choices, list_all=True)
                self.problems.at(sub, f"unknown key {key!r}{owner}{hint}")
                ok = False
            elif is_derived(known[key]) and not self.resolved:
                rule = known[key].metadata["derived"]
                self.problems.at(sub, f"derived, do not set (computed at load: {rule})")
                ok = False
            else:
                converted = self.value(value, hints[key], sub)
                ok &= converted is not BAD
                kwargs[key] = converted
        for name, f in known.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in raw:
                self.problems.at(f"{path}.{name}", "missing required key", origin=UNSET)
                ok = False
        return kwargs if ok else None

    def build(self, cls: type, kwargs: dict[str, Any], path: str) -> Any:
        """``cls(**kwargs)``, or ``BAD`` after recording the section's own check failures."""
        try:
            return cls(**kwargs)
        except SectionError as err:
            for name, message in err.fields:
                self.problems.at(f"{path}.{name}", message)
        except (TypeError, ValueError) as err:
            self.problems.at(path, str(err))
        return BAD

    def objective(self, raw: Any) -> dict[str, Any] | None:
        """Keyword arguments of :class:`ObjectiveSection` from the flat ``objective:`` mapping."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.problems.at("objective", f"expected a mapping, got {describe_value(raw)}")
            return None
        name = raw.get("name", ObjectiveSection.name)
        if not isinstance(name, str):
            self._expected(str, name, "objective.name")
            return None
        names = objective_names()
        if name not in names:
            hint = did_you_mean(name, names)
            choices = ", ".join(names)
            self.problems.at(
                "objective.name", f"unknown objective {name!r}{hint} (choices: {choices})"
            )
            return None
        config_cls = get_objective(name).Config
        params = {k: v for k, v in raw.items() if k != "name"}
        kwargs = self.fields(
            params, config_cls, "objective", also_known=("name",), owner=f" for objective {name!r}"
        )
        if kwargs is None:
            return None
        built = self.build(config_cls, kwargs, "objective")
        return None if built is BAD else {"name": name, "params": built}
