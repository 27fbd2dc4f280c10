"""The one strict YAML loader of run configurations.

``load_config(paths, overrides, world_size)`` reads YAML files in order (later files deep-merge
over earlier ones; lists and scalars replace), applies ``dotted.key=value`` overrides, converts
every value to its field's type, computes the derived values once, builds the frozen sections and
runs the cross-section rules of :func:`megatron.config.validate.validate_config`. Every problem is
collected first and raised together in one :class:`ConfigError`, each line reading
``FILE: dotted.path: message``.

This module (with :func:`save_config`) is the only place in ``megatron/`` that reads or writes YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron.config.sections import (
    SECTIONS,
    ConfigError,
    ObjectiveSection,
    RunConfig,
    SectionError,
    config_to_dict,
    is_derived,
    padded_vocab_size,
)
from megatron.config.validate import validate_config

OVERRIDE = "<override>"
UNSET = "<config>"
_BAD = object()  # marks a value that failed conversion (its problem is already recorded)
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PATH_RE = re.compile(r"\b([a-z_]+(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])+)")
_LAST_PART_RE = re.compile(r"(\.[^.\[]+|\[\d+\])$")


# ----------------------------------------------------------------------------- reading and merging
class _StrictYAMLLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys instead of keeping the last one silently."""


def _construct_mapping(loader: _StrictYAMLLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, typing.Hashable):
            continue  # construct_mapping below reports unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictYAMLLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


class _Problems:
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


def _read_yaml(path: Path, problems: _Problems) -> dict[str, Any] | None:
    if not path.is_file():
        reason = "is not a file" if path.exists() else "config file not found"
        problems.lines.append(f"{path}: {reason}")
        return None
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictYAMLLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        msg = err.problem or err.context or str(err)
        if err.context and err.context_mark is not None and err.problem:
            # e.g. an unclosed "[" is noticed at the end of the file; name where it was opened
            msg += f" ({err.context} at line {err.context_mark.line + 1})"
        problems.lines.append(f"{path}{line}: invalid YAML: {msg}")
        return None
    except yaml.YAMLError as err:
        problems.lines.append(f"{path}: invalid YAML: {err}")
        return None
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.lines.append(
            f"{path}: the top level must be a mapping of sections (model:, data:, ...), "
            f"got {_describe_value(data)}"
        )
        return None
    return data


def _record(value: Any, origin: str, path: str, sources: dict[str, str]) -> None:
    sources[path] = origin
    if isinstance(value, dict):
        for key, sub in value.items():
            _record(sub, origin, f"{path}.{key}", sources)


def _merge(dst: dict, src: dict, origin: str, prefix: str, sources: dict[str, str]) -> None:
    """Deep-merge ``src`` into ``dst`` (mappings merge; anything else replaces)."""
    for raw_key, value in src.items():
        key = str(raw_key)
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            sources[path] = origin
            _merge(dst[key], value, origin, path, sources)
            continue
        for stale in [p for p in sources if p.startswith((f"{path}.", f"{path}["))]:
            del sources[stale]
        dst[key] = copy.deepcopy(value)
        _record(value, origin, path, sources)


def _apply_override(tree: dict, text: str, problems: _Problems) -> None:
    key, sep, raw_value = text.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.match(key):
        problems.lines.append(f"{OVERRIDE}: {text!r}: expected dotted.key=value")
        return
    try:
        value = yaml.load(raw_value, Loader=_StrictYAMLLoader) if raw_value.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or err
        problems.lines.append(f"{OVERRIDE}: {key}: invalid YAML value {raw_value!r}: {problem}")
        return
    for part in reversed(key.split(".")):
        value = {part: value}
    _merge(tree, value, OVERRIDE, "", problems.sources)


# ----------------------------------------------------------------------------- type conversion
def _describe_value(value: Any) -> str:
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


def _describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_describe_type(a) for a in rest) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe_type(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    names = {
        bool: "a boolean (true or false)",
        int: "an integer",
        float: "a number",
        str: "a string",
    }
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _did_you_mean(word: str, choices: Iterable[str], *, list_all: bool = False) -> str:
    """``; did you mean 'x'?`` for the closest choice (or, with ``list_all``, all choices)."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid keys: {', '.join(choices)}" if list_all else ""


class _Converter:
    """Converts merged YAML values to typed field values, recording problems instead of raising."""

    def __init__(self, problems: _Problems, resolved: bool) -> None:
        self.problems = problems
        self.resolved = resolved

    def value(self, value: Any, hint: Any, path: str, shown: Any = None) -> Any:
        """``value`` converted to ``hint``, or ``_BAD`` after recording a problem.

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
            return _BAD if any(v is _BAD for v in items) else items
        if dataclasses.is_dataclass(hint):
            kwargs = self.fields(value, hint, path)
            return _BAD if kwargs is None else self.build(hint, kwargs, path)
        return self._scalar(value, hint, path, shown)

    def _expected(self, hint: Any, value: Any, path: str) -> Any:
        self.problems.at(path, f"expected {_describe_type(hint)}, got {_describe_value(value)}")
        return _BAD

    def _literal(self, value: Any, hint: Any, path: str) -> Any:
        choices = typing.get_args(hint)
        # Literal[0, 1] must not accept True/False (bool is an int subclass).
        if any(type(value) is type(c) and value == c for c in choices):
            return value
        message = (
            f"must be one of {', '.join(repr(c) for c in choices)} (got {_describe_value(value)})"
        )
        if isinstance(value, str):
            message += _did_you_mean(value, [c for c in choices if isinstance(c, str)])
        self.problems.at(path, message)
        return _BAD

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
                    return _BAD
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
            self.problems.at(path, f"expected a mapping, got {_describe_value(raw)}")
            return None
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        ok = True
        for key, value in raw.items():
            sub = f"{path}.{key}"
            if key not in known:
                choices = [*known, *also_known]
                hint = _did_you_mean(key, choices, list_all=True)
                self.problems.at(sub, f"unknown key {key!r}{owner}{hint}")
                ok = False
            elif is_derived(known[key]) and not self.resolved:
                rule = known[key].metadata["derived"]
                self.problems.at(sub, f"derived, do not set (computed at load: {rule})")
                ok = False
            else:
                converted = self.value(value, hints[key], sub)
                ok &= converted is not _BAD
                kwargs[key] = converted
        for name, f in known.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in raw:
                self.problems.at(f"{path}.{name}", "missing required key", origin=UNSET)
                ok = False
        return kwargs if ok else None

    def build(self, cls: type, kwargs: dict[str, Any], path: str) -> Any:
        """``cls(**kwargs)``, or ``_BAD`` after recording the section's own check failures."""
        try:
            return cls(**kwargs)
        except SectionError as err:
            for name, message in err.fields:
                self.problems.at(f"{path}.{name}", message)
        except (TypeError, ValueError) as err:
            self.problems.at(path, str(err))
        return _BAD

    def objective(self, raw: Any) -> dict[str, Any] | None:
        """Keyword arguments of :class:`ObjectiveSection` from the flat ``objective:`` mapping."""
        from megatron.objectives.registry import get_objective, objective_names

        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.problems.at("objective", f"expected a mapping, got {_describe_value(raw)}")
            return None
        name = raw.get("name", ObjectiveSection.name)
        if not isinstance(name, str):
            self._expected(str, name, "objective.name")
            return None
        names = objective_names()
        if name not in names:
            hint = _did_you_mean(name, names)
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
        return None if built is _BAD else {"name": name, "params": built}


# ----------------------------------------------------------------------------- derived values
def _int_at_least_1(section: dict[str, Any] | None, key: str, default: int | None) -> int | None:
    value = (section or {}).get(key, default)
    return value if isinstance(value, int) and value >= 1 else None


def _derive(
    kw: dict[str, dict[str, Any] | None],
    world_size: int | None,
    resolved: bool,
    problems: _Problems,
) -> int | None:
    """Fill the derived values into the section kwargs; returns the world size to validate against.

    The world size is ``world_size`` when given, else ``launcher.num_nodes x
    launcher.nproc_per_node`` when ``nproc_per_node`` is set, else unknown: then
    ``parallel.data`` is 1 (or, for a resolved config, the saved value).
    """
    par, launcher = kw.get("parallel"), kw.get("launcher")
    tp = _int_at_least_1(par, "tensor", 1)
    pp = _int_at_least_1(par, "pipeline", 1)
    world = world_size
    if world is None and launcher is not None and launcher.get("nproc_per_node") is not None:
        nodes = _int_at_least_1(launcher, "num_nodes", 1)
        nproc = _int_at_least_1(launcher, "nproc_per_node", None)
        world = nodes * nproc if nodes and nproc else None
    dp: int | None = None
    if par is not None and tp and pp:
        saved = par.get("data")
        if world is not None:
            dp = max(1, world // (tp * pp))
        elif resolved and isinstance(saved, int) and saved >= 1:
            dp = saved
        else:
            dp = 1
        _check_resolved(problems, "parallel.data", saved, dp, resolved)
        par["data"] = dp
    _derive_model(kw.get("model"), tp, resolved, problems)
    _derive_training(kw.get("training"), dp, problems)
    _derive_defaults(kw)
    return world


def _check_resolved(
    problems: _Problems, path: str, given: Any, derived: Any, resolved: bool
) -> None:
    if resolved and given is not None and given != derived:
        problems.at(path, f"is {given} in the resolved config but derives to {derived}")


def _derive_model(
    model: dict[str, Any] | None, tp: int | None, resolved: bool, problems: _Problems
) -> None:
    if model is None:
        return
    hidden = _int_at_least_1(model, "hidden_size", None)
    heads = _int_at_least_1(model, "num_attention_heads", None)
    if hidden and heads:
        _check_resolved(
            problems, "model.kv_channels", model.get("kv_channels"), hidden // heads, resolved
        )
        model["kv_channels"] = hidden // heads
    vocab = _int_at_least_1(model, "vocab_size", None)
    divisible_by = _int_at_least_1(model, "make_vocab_size_divisible_by", 128)
    if vocab and divisible_by and tp:
        padded = padded_vocab_size(vocab, divisible_by, tp)
        _check_resolved(
            problems, "model.padded_vocab_size", model.get("padded_vocab_size"), padded, resolved
        )
        model["padded_vocab_size"] = padded


def _derive_training(training: dict[str, Any] | None, dp: int | None, problems: _Problems) -> None:
    if training is None or dp is None:
        return
    micro = _int_at_least_1(training, "micro_batch_size", 1)
    accumulation = training.get("gradient_accumulation_steps")
    global_batch = training.get("global_batch_size")
    if micro is None:
        return
    if global_batch is None:
        accumulation = accumulation if accumulation is not None else 1
        training["gradient_accumulation_steps"] = accumulation
        training["global_batch_size"] = micro * accumulation * dp
    elif accumulation is None:
        if global_batch % (micro * dp):
            problems.at(
                "training.global_batch_size",
                f"({global_batch}) must be divisible by training.micro_batch_size ({micro}) x "
                f"data parallel size ({dp}) = {micro * dp}",
            )
            return
        training["gradient_accumulation_steps"] = max(1, global_batch // (micro * dp))


def _derive_defaults(kw: dict[str, dict[str, Any] | None]) -> None:
    training, schedule = kw.get("training"), kw.get("schedule")
    if schedule is not None and schedule.get("decay_iters") is None and training:
        train_iters = training.get("train_iters")
        if isinstance(train_iters, int) and train_iters >= 1:
            schedule["decay_iters"] = train_iters
    logging_kw, checkpoint = kw.get("logging"), kw.get("checkpoint")
    if logging_kw is not None and logging_kw.get("dir") is None and checkpoint is not None:
        logging_kw["dir"] = checkpoint.get("save") or "runs/default"


# ----------------------------------------------------------------------------- public API
def load_config(
    paths: Sequence[str | Path] | str | Path,
    overrides: Sequence[str] = (),
    world_size: int | None = None,
    *,
    resolved: bool = False,
) -> RunConfig:
    """Load, merge, type-check, resolve and validate a run configuration.

    Args:
        paths: YAML files, merged in order (later files deep-merge over earlier ones; lists and
            scalars replace). A single path is accepted too.
        overrides: ``dotted.key=value`` strings applied after the files; the value is parsed as
            YAML (``training.train_iters=50``, ``optimizer.betas=[0.9,0.95]``,
            ``checkpoint.load=null``). List items cannot be addressed (set the whole list).
        world_size: number of ranks. ``parallel.data`` becomes world_size // (tensor x pipeline)
            and world = tensor x pipeline x data is checked. ``None``: use ``launcher.num_nodes x
            launcher.nproc_per_node`` when ``nproc_per_node`` is set, else ``parallel.data = 1``
            (for ``resolved=True``: the saved value) and the world-size rule is skipped.
        resolved: accept the derived keys (``parallel.data``, ``model.kv_channels``,
            ``model.padded_vocab_size``) that :func:`save_config` writes; each must equal what
            the rest of the config derives. Off by default: derived keys in YAML are errors.

    Returns:
        The frozen :class:`RunConfig`.

    Raises:
        ConfigError: listing every problem found, one ``FILE: dotted.path: message`` per line.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    problems = _Problems()
    tree: dict[str, Any] = {}
    for path in paths:
        data = _read_yaml(Path(path), problems)
        if data is not None:
            _merge(tree, data, str(path), "", problems.sources)
    if problems.lines:  # unreadable files: key checks would only add noise
        raise ConfigError(problems.lines)
    for text in overrides:
        _apply_override(tree, text, problems)
    if world_size is not None and (isinstance(world_size, bool) or world_size < 1):
        problems.lines.append(f"{UNSET}: world size ({world_size}) must be >= 1")
        world_size = None
    cfg, world = _build(tree, problems, world_size, resolved)
    if cfg is not None:
        for message in validate_config(cfg, world):
            problems.rule(message)
    if problems.lines or cfg is None:
        raise ConfigError(problems.lines)
    return cfg


def _build(
    tree: dict[str, Any], problems: _Problems, world_size: int | None, resolved: bool
) -> tuple[RunConfig | None, int | None]:
    converter = _Converter(problems, resolved)
    for key in tree:
        if key not in SECTIONS:
            hint = _did_you_mean(key, SECTIONS) or f"; sections: {', '.join(SECTIONS)}"
            problems.at(key, f"unknown section {key!r}{hint}")
    kw: dict[str, dict[str, Any] | None] = {}
    for name, cls in SECTIONS.items():
        raw = tree.get(name, {})
        if name == "objective":
            kw[name] = converter.objective(raw)
        else:
            kw[name] = converter.fields(raw, cls, name)
    world = _derive(kw, world_size, resolved, problems)
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        section_kw = kw[name]
        if section_kw is not None:
            built[name] = converter.build(cls, section_kw, name)
    if len(built) < len(SECTIONS) or any(v is _BAD for v in built.values()):
        return None, world
    return RunConfig(**built), world


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (temporary file, then ``os.replace``).

    Read it back with ``load_config([path], resolved=True, world_size=...)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Resolved run configuration (derived values included); "
        "load with load_config([path], resolved=True).\n"
    )
    text = header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A saved config file (e.g. a checkpoint's ``config.yml``) as plain data, unvalidated.

    For tools that need one section of a config written by this project (a converted
    checkpoint holds only ``model`` and ``parallel``); runs use :func:`load_config`.

    Raises:
        ConfigError: the file is missing or not a YAML mapping.
    """
    problems = _Problems()
    data = _read_yaml(Path(path), problems)
    if problems.lines:
        raise ConfigError(problems.lines)
    return data or {}


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split a command line into config files and ``dotted.key=value`` overrides.

    A ``*.yml``/``*.yaml`` argument is a file even if its path contains ``=``; launcher flags
    (``--local_rank=N`` from the DeepSpeed runner) are dropped. For ``train.py``, ``deepy.py``
    and tools that take a run's config.
    """
    files, overrides = [], []
    for a in argv:
        if a.startswith(("--local_rank", "--local-rank")):
            continue
        (overrides if "=" in a and not a.endswith((".yml", ".yaml")) else files).append(a)
    return files, overrides
