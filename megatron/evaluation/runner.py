"""Running lm-eval tasks on a native checkpoint or on live weights, and reporting the results.

Used by ``tools/eval.py`` (a saved checkpoint on any TP x DP grid) and by the trainer's in-loop
evaluation (``training.eval_tasks``, the live sharded weights). Results are lm-eval's own
(``simple_evaluate``'s ``results`` section); :func:`flat_metrics` names them
``eval/<task>/<metric>`` for the run's ``metrics.jsonl``, :func:`format_table` prints them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

from megatron.ckpt import ConversionError
from megatron.ckpt.hf_config import model_config_from_section
from megatron.ckpt.layout import resolve_checkpoint
from megatron.ckpt.native import load_tp_shard, read_checkpoint_config
from megatron.ckpt.run_tokenizer import find_run_tokenizer
from megatron.evaluation.errors import EvalError
from megatron.evaluation.tasks import resolve_tasks
from megatron.model.gpt import build_loaded
from megatron.parallel import ParallelState
from megatron.scoring import DTYPES  # the compute dtypes of --dtype, shared with scoring

logger = logging.getLogger(__name__)


def load_eval_model(
    ckpt: str | Path, state: ParallelState, device: torch.device, dtype: str = "fp32"
) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """``(model, checkpoint config, checkpoint root)``: this rank's TP shard of a native
    checkpoint (written at any TP, PP and ZeRO stage; resharded to ``state.tp_size``).

    Raises:
        EvalError: no checkpoint there, or its weights do not fit its config.
    """
    try:
        root, config = read_checkpoint_config(ckpt)
        tag_dir = root / resolve_checkpoint(ckpt)[1]
        args = model_config_from_section(config.get("model") or {}, state.tp_size)
        shard = load_tp_shard(tag_dir, args, state.tp_size, state.tp_rank, mmap=False)
    except (ConversionError, ValueError) as e:
        raise EvalError(f"--ckpt {ckpt}: {e}") from e
    model = build_loaded(args, state, shard).to(device=device, dtype=DTYPES[dtype])
    return model.eval().requires_grad_(False), config, root


def default_tokenizer(config: dict[str, Any], root: Path) -> str:
    """The run's tokenizer: the checkpoint's ``hf/`` (a converted model's), else
    ``data.tokenizer``, else the one recorded in its training data's metadata (the order of
    :func:`megatron.ckpt.run_tokenizer.find_run_tokenizer`, which the HF export uses too).

    Raises:
        EvalError: none of them is a tokenizer directory (pass ``--tokenizer``).
    """
    found = find_run_tokenizer(config, root / "hf", None)
    if found is None:
        raise EvalError(
            f"{root}: no tokenizer found ({root / 'hf'}, data.tokenizer of its config.yml, the "
            "training data's metadata); pass --tokenizer DIR"
        )
    return str(found.path)


def load_hf_tokenizer(path: str | Path) -> Any:
    """The Hugging Face tokenizer in ``path`` (a directory).

    Raises:
        EvalError: it cannot be loaded, or it has no EOS token (generation needs one).
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise EvalError(f"tokenizer {path}: cannot load it ({e})") from e
    if tok.eos_token_id is None:
        raise EvalError(f"tokenizer {path}: it has no EOS token (lm-eval needs one)")
    return tok


def run_tasks(
    lm: Any,
    names: list[str],
    *,
    include_paths: list[str | Path] | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    bootstrap_iters: int = 100_000,
    seed: int = 1234,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``names`` with model ``lm`` (its whole output dict, on
    every rank: a collective when distributed).

    Raises:
        EvalError: see :func:`~megatron.evaluation.tasks.resolve_tasks`.
    """
    manager, specs = resolve_tasks(names, include_paths)
    import lm_eval.api.task
    from lm_eval import simple_evaluate

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    bars = contextlib.nullcontext()
    if not getattr(lm, "progress", True):
        # why: lm-eval 0.4.13 draws a bar per task while building requests (api/task.py) with
        # no switch; quiet callers (the trainer, the demo) get none
        from tqdm import tqdm

        bars = mock.patch.object(lm_eval.api.task, "tqdm", functools.partial(tqdm, disable=True))
    with bars:
        results = simple_evaluate(
            model=lm,
            tasks=specs,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    # why: lm-eval 0.4.13 builds its report only where LOCAL_RANK is 0 (evaluator.py); every
    # rank computed the same metrics, so world rank 0's report is everyone's
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [results if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        results = box[0]
    if results is None:
        raise RuntimeError("lm-eval returned no results on world rank 0")
    return results


def _metric_items(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """``(task, metric, value, stderr)`` of every numeric metric, ``metric`` as lm-eval names
    it without the ``,none`` filter suffix (``exact_match@strict`` for other filters)."""
    out = []
    for task, values in sorted((results.get("results") or {}).items()):
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric}@{filt}"
            err = float(stderr) if isinstance(stderr, int | float) else None
            out.append((task, name, float(value), err))
    return out


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"eval/<task>/<metric>": value}`` for a metrics log."""
    return {f"eval/{t}/{m}": v for t, m, v, _ in _metric_items(results) if math.isfinite(v)}


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: task, metric, value, stderr, samples."""
    counts = results.get("n-samples") or {}
    rows = [("task", "metric", "value", "stderr", "n")]
    for task, metric, value, err in _metric_items(results):
        n = (counts.get(task) or {}).get("effective", "")
        rows.append((task, metric, f"{value:.4f}", "" if err is None else f"{err:.4f}", str(n)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )
