"""The evaluation package's error and its one dependency check."""

from __future__ import annotations

from types import ModuleType


class EvalError(ValueError):
    """Evaluation input that cannot be used; the message names the task, file or flag and the fix."""


LM_EVAL_HINT = 'pip install "lm-eval>=0.4.5,<0.5" (or pip install -e ".[eval]")'
"""How to install lm-evaluation-harness (an extra of this project; ``make`` installs it)."""


def require_lm_eval() -> ModuleType:
    """The ``lm_eval`` package (its ``api.model`` loaded).

    Raises:
        EvalError: lm-evaluation-harness is not installed (naming what to install).
    """
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401 - the LM base classes
    except ImportError as e:
        raise EvalError(f"lm-evaluation-harness is not installed ({e}); {LM_EVAL_HINT}") from None
    return lm_eval
