"""Finding lm-eval tasks: the repository's local tasks, a user's ``--include-path``, lm-eval's own.

lm-eval's ``TaskManager`` indexes task YAMLs. Indexing its ~15,000 built-in tasks takes ~15 s,
so the local directories are indexed first and the built-in index is built only when a
requested name is not local (or to suggest close matches for a name found nowhere).

A local task may keep its data next to its YAML: ``dataset_path: json`` with relative
``dataset_kwargs.data_files`` (a string, a list, or a split -> string/list mapping). Hugging Face
``datasets`` would resolve them against the working directory; :func:`resolve_tasks` makes them
relative to the YAML's directory instead, so the tasks run from anywhere.
"""

from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any

from megatron.evaluation.errors import EvalError, require_lm_eval

logger = logging.getLogger(__name__)

LOCAL_TASKS = Path(__file__).resolve().parents[2] / "configs" / "eval"
"""The tasks that ship with the repository (``configs/eval``: the demo's checkable tasks)."""


def check_include_path(path: str | Path) -> Path:
    """``path`` as a directory holding at least one task YAML (searched recursively).

    Raises:
        EvalError: not a directory, or no ``*.yaml`` / ``*.yml`` in it.
    """
    p = Path(path)
    if not p.is_dir():
        raise EvalError(f"--include-path {p}: not a directory")
    if not any(p.rglob("*.yaml")) and not any(p.rglob("*.yml")):
        raise EvalError(
            f"--include-path {p}: no task YAML files (*.yaml) in it or below; point it at the "
            "directory of your lm-eval task configs"
        )
    return p


def _absolute(files: Any, base: Path) -> Any:
    if isinstance(files, str):
        is_remote = "://" in files or files.startswith("hf://")
        return files if is_remote or Path(files).is_absolute() else str(base / files)
    if isinstance(files, list):
        return [_absolute(f, base) for f in files]
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    return files


def _local_spec(entry: Any) -> dict[str, Any] | None:
    """A task config dict with its relative ``data_files`` made absolute; None: not needed."""
    cfg = getattr(entry, "cfg", None)
    yaml_path = getattr(entry, "yaml_path", None)
    if not isinstance(cfg, dict) or yaml_path is None or "include" in cfg:
        return None
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return None
    spec = copy.deepcopy(cfg)
    spec["dataset_kwargs"]["data_files"] = _absolute(files, Path(yaml_path).parent)
    return spec


def task_manager(paths: list[Path], defaults: bool) -> Any:
    """lm-eval's ``TaskManager`` over ``paths`` (and its ~15,000 built-in tasks with
    ``defaults``).

    Raises:
        EvalError: lm-eval is not installed.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=defaults)


def resolve_tasks(
    names: list[str], include_paths: list[str | Path] | None = None
) -> tuple[Any, list[str | dict[str, Any]]]:
    """``(TaskManager, task specs)`` for ``names`` (for ``lm_eval.simple_evaluate``).

    Args:
        names: task, group or tag names.
        include_paths: directories of the user's task YAMLs, searched before lm-eval's own;
            the repository's :data:`LOCAL_TASKS` are always included.

    Raises:
        EvalError: no names, an include path without YAMLs, or a name no index knows (with
            close matches).
    """
    if not names:
        raise EvalError("no tasks given (e.g. --tasks demo_mc,demo_gen)")
    paths = [check_include_path(p) for p in include_paths or []]
    if LOCAL_TASKS.is_dir():
        paths.append(LOCAL_TASKS)
    manager = task_manager(paths, defaults=False)
    if not all(n in manager.all_tasks for n in names):
        logger.info("indexing lm-eval's built-in tasks (%s not local)", names)
        manager = task_manager(paths, defaults=True)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        lines = []
        for n in unknown:
            close = difflib.get_close_matches(n, sorted(known), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            lines.append(f"unknown task {n!r}{hint}")
        raise EvalError(
            "; ".join(lines)
            + " (`python tools/eval.py --list-tasks` lists them; add your own YAMLs with "
            "--include-path DIR)"
        )
    specs: list[str | dict[str, Any]] = []
    for n in names:
        spec = _local_spec(manager.task_index.get(n)) if hasattr(manager, "task_index") else None
        specs.append(spec if spec is not None else n)
    return manager, specs
