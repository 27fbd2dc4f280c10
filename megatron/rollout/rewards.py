"""Reward functions for online RL, with TRL's signature, so a TRL user's function runs unchanged.

A reward function is ``f(prompts: list[str], completions: list[str], **kwargs) -> list[float |
None]`` (TRL 1.16's ``GRPOTrainer`` / ``RLOOTrainer`` contract): one value per completion, ``None``
where the function does not apply (that completion is left out of the function's statistics, and
a completion no function applies to gets no advantage). The keyword arguments are the prompt rows'
extra columns (e.g. a reference ``answer``), one value per completion, plus ``completion_ids``
(the sampled token ids), as TRL passes them; a function therefore has to accept ``**kwargs``.

Functions are named in the config as ``"path/to/file.py:name"`` (a path relative to the config
file's directory, or absolute) or ``"package.module:name"``, each with a ``weight``; the total
reward is the weighted sum over the functions that apply (TRL's ``nansum``). Anything wrong is one
:class:`RewardError` naming the function (and, for a bad value or a failure, the prompt row):
a file or name that does not exist, a wrong signature, the wrong number of values, a value that is
not a number, NaN, or an exception — the run stops; nothing is silently zeroed.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron.rollout.advantages import nanstd


class RewardError(ValueError):
    """A reward function that cannot be loaded or returned something unusable."""


@dataclass(frozen=True)
class RewardFunction:
    """A loaded reward function.

    Attributes:
        name: the function's name, as metrics show it (``rewards/<name>/mean``).
        spec: what the config said (``file.py:name`` or ``module:name``).
        fn: the callable.
        weight: its weight in the total reward.
    """

    name: str
    spec: str
    fn: Callable[..., Sequence[float | None]]
    weight: float = 1.0


def load_reward_function(
    spec: str, weight: float = 1.0, base_dir: str | Path | None = None
) -> RewardFunction:
    """Import ``spec`` (``path/to/file.py:name`` or ``package.module:name``) and check that it
    takes TRL's arguments.

    Args:
        spec: where the function is.
        weight: its weight in the total reward.
        base_dir: what a relative file path is relative to (the config file's directory).

    Raises:
        RewardError: no such file, module or name, not callable, or a wrong signature.
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise RewardError(
            f"reward function {spec!r}: expected 'path/to/file.py:name' or 'package.module:name'"
        )
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise RewardError(f"reward function {spec!r}: file {path} does not exist")
        # why the file's size and time in the name: the config loader and the rollout set-up
        # load the same file in one process; it runs once unless it changed in between
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        module_name = f"_megatron_reward_{abs(hash(key))}"
        module = sys.modules.get(module_name)
        if module is None:
            module = _exec_file(spec, path, module_name)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise RewardError(f"reward function {spec!r}: cannot import {where!r}: {e}") from e
    fn = getattr(module, name, None)
    if fn is None:
        names = [n for n in vars(module) if not n.startswith("_")]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RewardError(f"reward function {spec!r}: {where} has no {name!r}{hint}")
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {name!r} is not callable")
    _check_signature(spec, fn)
    return RewardFunction(name=name, spec=spec, fn=fn, weight=float(weight))


def _exec_file(spec: str, path: Path, module_name: str) -> Any:
    """Run a reward file as module ``module_name`` (registered in ``sys.modules`` only when it
    ran: dataclasses and pickling look modules up there)."""
    loader = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported whole
        del sys.modules[module_name]
        raise RewardError(f"reward function {spec!r}: importing {path} failed: {e!r}") from e
    return module


def _check_signature(spec: str, fn: Callable) -> None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return  # a builtin or C function: checked by calling it
    kinds = {p.kind for p in params.values()}
    named = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    takes_kwargs = inspect.Parameter.VAR_KEYWORD in kinds
    if not ({"prompts", "completions"} <= named and takes_kwargs):
        raise RewardError(
            f"reward function {spec!r} has the signature {inspect.signature(fn)}; it must accept "
            "(prompts, completions, **kwargs) as TRL's reward functions do (the prompt rows' "
            "extra columns and completion_ids come as keyword arguments)"
        )


@dataclass(frozen=True)
class Scores:
    """The rewards of one batch of completions.

    Attributes:
        total: ``[B]`` float32 weighted sum over the functions that apply; NaN where none does.
        per_function: ``[B, F]`` float32 each function's values (NaN = ``None``).
        metrics: ``rewards/<name>/mean`` and ``/std`` per function (over the values given).
    """

    total: torch.Tensor
    per_function: torch.Tensor
    metrics: dict[str, float]


def score_completions(
    functions: Sequence[RewardFunction],
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, list[Any]] | None = None,
    completion_ids: list[list[int]] | None = None,
    prompt_rows: list[int] | None = None,
) -> Scores:
    """Call every reward function on the batch and combine their values.

    Args:
        functions: the loaded reward functions.
        prompts: ``B`` prompts (a prompt repeated for each of its completions): strings, or
            message lists for conversational data.
        completions: ``B`` completions: strings, or ``[{"role": "assistant", "content": ...}]``.
        columns: the prompt rows' extra columns, ``B`` values each.
        completion_ids: ``B`` token-id lists (passed as ``completion_ids``, as TRL does).
        prompt_rows: each completion's prompt row in the dataset (for error messages).

    Raises:
        RewardError: a function raised, returned the wrong number of values, a non-number or NaN
            (naming the function and the prompt row).
    """
    values = function_values(functions, prompts, completions, columns, completion_ids, prompt_rows)
    return combine(values, functions)


def function_values(
    functions: Sequence[RewardFunction],
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, list[Any]] | None = None,
    completion_ids: list[list[int]] | None = None,
    prompt_rows: list[int] | None = None,
) -> torch.Tensor:
    """``[B, F]`` float32: each function's value per completion, NaN where it gave ``None``
    (arguments and errors as :func:`score_completions`)."""
    n = len(completions)
    rows = list(range(n)) if prompt_rows is None else list(prompt_rows)
    kwargs = dict(columns or {})
    if completion_ids is not None:
        kwargs["completion_ids"] = completion_ids
    values = torch.full((n, len(functions)), math.nan, dtype=torch.float32)
    if n == 0:  # a rank without held-out prompts to complete: nothing to ask the functions
        return values
    for j, f in enumerate(functions):
        out = _call(f, prompts, completions, kwargs, rows)
        if not isinstance(out, Sequence) or isinstance(out, str) or len(out) != n:
            size = len(out) if isinstance(out, Sequence) else type(out).__name__
            raise RewardError(
                f"reward function {f.spec!r} returned {size} values for {n} completions "
                f"(prompt rows {rows[0]}..{rows[-1]}); it must return one per completion"
            )
        for i, v in enumerate(out):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise RewardError(
                    f"reward function {f.spec!r} returned {v!r} for completion {i} (prompt row "
                    f"{rows[i]}); values must be numbers or None"
                )
            if math.isnan(float(v)):
                raise RewardError(
                    f"reward function {f.spec!r} returned NaN for completion {i} (prompt row "
                    f"{rows[i]}); return None where it does not apply"
                )
            values[i, j] = float(v)
    return values


def combine(values: torch.Tensor, functions: Sequence[RewardFunction]) -> Scores:
    """:class:`Scores` of ``[B, F]`` values (NaN = not applicable): the weighted sum over the
    functions that apply (NaN where none does), and each function's mean and std."""
    weights = torch.tensor([f.weight for f in functions], dtype=torch.float32)
    total = (values * weights).nansum(dim=1)
    total[torch.isnan(values).all(dim=1)] = math.nan
    metrics = {}
    for j, f in enumerate(functions):
        metrics[f"rewards/{f.name}/mean"] = float(torch.nanmean(values[:, j]))
        metrics[f"rewards/{f.name}/std"] = float(nanstd(values[:, j]))
    return Scores(total, values, metrics)


def _call(f: RewardFunction, prompts, completions, kwargs, rows) -> Any:
    try:
        return f.fn(prompts=prompts, completions=completions, **kwargs)
    except Exception as e:  # noqa: BLE001 - find the row, then report the user's error whole
        bad = _failing_row(f, prompts, completions, kwargs)
        where = f"prompt row {rows[bad]} (completion {bad})" if bad is not None else "the batch"
        raise RewardError(f"reward function {f.spec!r} failed on {where}: {e!r}") from e


def _failing_row(f: RewardFunction, prompts, completions, kwargs) -> int | None:
    """The first completion the function fails on alone, or ``None`` if each passes alone."""
    for i in range(len(completions)):
        one = {k: v[i : i + 1] for k, v in kwargs.items()}
        try:
            f.fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1], **one)
        except Exception:  # noqa: BLE001
            return i
    return None
