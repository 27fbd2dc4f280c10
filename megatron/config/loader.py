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
import os
import re
import tempfile
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from megatron.config.sections import (
    LIST_SECTIONS,
    SECTIONS,
    RunConfig,
    config_to_dict,
    padded_vocab_size,
)
from megatron.config.typed import BAD, UNSET, Converter, Problems, describe_value, did_you_mean
from megatron.config.validate import validate_config
from megatron.data.collators import default_layout
from megatron.errors import ConfigError
from megatron.objectives.registry import get_objective

OVERRIDE = "<override>"
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


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


def _read_yaml(path: Path, problems: Problems) -> dict[str, Any] | None:
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
            f"got {describe_value(data)}"
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


def _apply_override(tree: dict, text: str, problems: Problems) -> None:
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


# ----------------------------------------------------------------------------- derived values
def _int_at_least_1(section: dict[str, Any] | None, key: str, default: int | None) -> int | None:
    value = (section or {}).get(key, default)
    return value if isinstance(value, int) and value >= 1 else None


def _derive(
    kw: dict[str, dict[str, Any] | None],
    world_size: int | None,
    resolved: bool,
    problems: Problems,
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
    problems: Problems, path: str, given: Any, derived: Any, resolved: bool
) -> None:
    if resolved and given is not None and given != derived:
        problems.at(path, f"is {given} in the resolved config but derives to {derived}")


def _derive_model(
    model: dict[str, Any] | None, tp: int | None, resolved: bool, problems: Problems
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


def _derive_training(training: dict[str, Any] | None, dp: int | None, problems: Problems) -> None:
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
    data, objective = kw.get("data"), kw.get("objective")
    if data is not None and objective is not None and data.get("layout", "auto") == "auto":
        data["layout"] = default_layout(get_objective(objective["name"]).batch_kind)
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
    problems = Problems()
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
    tree: dict[str, Any], problems: Problems, world_size: int | None, resolved: bool
) -> tuple[RunConfig | None, int | None]:
    converter = Converter(problems, resolved)
    for key in tree:
        if key not in SECTIONS:
            hint = did_you_mean(key, SECTIONS) or f"; sections: {', '.join(SECTIONS)}"
            problems.at(key, f"unknown section {key!r}{hint}")
    kw: dict[str, dict[str, Any] | None] = {}
    lists: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        raw = tree.get(name, {})
        if name in LIST_SECTIONS:
            lists[name] = converter.value([] if raw in ({}, None) else raw, list[cls], name)
        elif name == "objective":
            kw[name] = converter.objective(raw)
        else:
            kw[name] = converter.fields(raw, cls, name)
    world = _derive(kw, world_size, resolved, problems)
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        if name in LIST_SECTIONS:
            built[name] = lists[name]
            continue
        section_kw = kw[name]
        if section_kw is not None:
            built[name] = converter.build(cls, section_kw, name)
    if built.get("rewards") not in (None, BAD):
        built["rewards"] = resolve_rewards(built["rewards"], problems)
    if len(built) < len(SECTIONS) or any(v is BAD for v in built.values()):
        return None, world
    return RunConfig(**built), world


def resolve_rewards(specs: list[Any], problems: Problems) -> list[Any]:
    """The ``rewards`` entries with each function file made absolute (relative to the YAML
    file that names it; the working directory for a command-line override) and each function
    imported and checked once (:func:`megatron.rollout.rewards.load_reward_function`), and each
    reward model's directory checked to exist."""
    from megatron.rollout.rewards import RewardError, load_reward_function

    out = []
    for i, spec in enumerate(specs):
        path = f"rewards[{i}]"
        origin = problems.origin(f"{path}.function")
        if spec.function is not None:
            where, sep, name = spec.function.rpartition(":")
            if sep and where.endswith(".py") and not os.path.isabs(where):
                base = Path(origin).parent if origin not in (OVERRIDE, UNSET) else Path.cwd()
                absolute = str((base / where).resolve())
                spec = dataclasses.replace(spec, function=f"{absolute}:{name}")
            try:
                load_reward_function(spec.function, spec.weight)
            except RewardError as e:
                problems.at(f"{path}.function", str(e), origin=origin)
        elif not Path(spec.model).exists():
            problems.at(f"{path}.model", f"{spec.model} does not exist", origin=origin)
        out.append(spec)
    labels = [s.label for s in out]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        problems.at(
            "rewards",
            f"two rewards are named {label!r} (their metrics would collide); give each a name",
        )
    return out


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
    problems = Problems()
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
