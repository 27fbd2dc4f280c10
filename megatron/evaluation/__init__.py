"""Evaluation: lm-evaluation-harness tasks on the native sharded model (:mod:`.harness`), task
lookup with the repository's local tasks (:mod:`.tasks`), and the runner shared by
``tools/eval.py`` and the trainer's in-loop evaluation (:mod:`.runner`).

Importing this package does not import lm-eval; :mod:`.harness` does.
"""

from megatron.evaluation.errors import EvalError, require_lm_eval

__all__ = ["EvalError", "require_lm_eval"]
