"""lm-eval tasks during training (``training.eval_tasks``) on the live sharded weights.

At each evaluation whose step is a multiple of ``training.eval_tasks_interval`` (default: every
evaluation) the trainer calls :meth:`TaskEvaluator.run`: a :class:`~megatron.evaluation.harness.ShardedLM`
over the DeepSpeed engine runs the tasks (requests split over the data-parallel replicas, results
gathered), and the tasks' metrics come back as ``eval/<task>/<metric>`` for the validation record
of ``metrics.jsonl``. Rank 0 logs the table and the first generations of generating tasks.
lm-eval's seeds are fixed, so the same weights give the same numbers at every evaluation.
"""

from __future__ import annotations

import logging
from typing import Any

from megatron.evaluation.errors import EvalError
from megatron.utils import log_rank0

logger = logging.getLogger(__name__)

SAMPLE_GENERATIONS = 3
"""Generations per ``generate_until`` task logged by rank 0 at each evaluation."""


def tokenizer_path(cfg: Any) -> str:
    """The run's tokenizer for ``training.eval_tasks``: ``data.tokenizer``, else the one
    recorded in the training data's metadata.

    Raises:
        EvalError: neither names a directory.
    """
    from pathlib import Path

    from megatron.config import config_to_dict
    from megatron.evaluation.runner import default_tokenizer

    root = Path(cfg.checkpoint.save or cfg.logging.dir or ".")
    try:
        return default_tokenizer(config_to_dict(cfg), root)
    except EvalError as e:
        raise EvalError(f"training.eval_tasks: {e}; set data.tokenizer") from None


def check_eval_tasks(cfg: Any) -> list[str]:
    """Problems with ``training.eval_tasks`` found before launch (tasks known, tokenizer there)."""
    t = cfg.training
    if not t.eval_tasks:
        return []
    from megatron.evaluation.tasks import resolve_tasks

    problems = []
    try:
        resolve_tasks(list(t.eval_tasks), list(t.eval_tasks_include_path))
    except EvalError as e:
        problems.append(f"training.eval_tasks: {e}")
    try:
        tokenizer_path(cfg)
    except EvalError as e:
        problems.append(str(e))
    return problems


class TaskEvaluator:
    """Runs ``training.eval_tasks`` on a trainer's engine.

    Args:
        cfg: the run config.
        engine: the DeepSpeed engine (or the model) holding this rank's TP shard.
        state: the parallel state.
    """

    def __init__(self, cfg: Any, engine: Any, state: Any) -> None:
        from megatron.evaluation.harness import ShardedLM
        from megatron.evaluation.runner import load_hf_tokenizer

        t = cfg.training
        self.tasks = list(t.eval_tasks)
        self.include_paths = list(t.eval_tasks_include_path)
        self.limit, self.num_fewshot = t.eval_tasks_limit, t.eval_tasks_num_fewshot
        self.interval = t.eval_tasks_interval
        self.seed = t.seed
        self.lm = ShardedLM(
            engine,
            load_hf_tokenizer(tokenizer_path(cfg)),
            state,
            batch_size=t.eval_tasks_batch_size,
            seed=t.seed,
            on_generations=self._log_generations,
            progress=False,
        )

    def due(self, step: int) -> bool:
        """Whether the evaluation at ``step`` runs the tasks."""
        return self.interval is None or step % self.interval == 0

    def _log_generations(self, contexts: list[str], outputs: list[str]) -> None:
        for context, output in list(zip(contexts, outputs, strict=True))[:SAMPLE_GENERATIONS]:
            log_rank0("  generation: %r -> %r", context[-80:], output[:120])

    def run(self, step: int) -> dict[str, float]:
        """The tasks' metrics at ``step`` (``eval/<task>/<metric>``), the same on every rank."""
        import torch

        from megatron.evaluation.runner import flat_metrics, format_table, run_tasks

        with torch.no_grad():
            results = run_tasks(
                self.lm,
                self.tasks,
                include_paths=self.include_paths,
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                bootstrap_iters=0,
                seed=self.seed,
            )
        log_rank0("eval tasks at step %d:\n%s", step, format_table(results))
        return flat_metrics(results)
