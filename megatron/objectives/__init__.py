"""Training objectives. Importing this package registers every built-in objective."""

from megatron.objectives import lm  # noqa: F401  (registers "lm")
from megatron.objectives.registry import (
    Objective,
    get_objective,
    objective_names,
    register_objective,
)

__all__ = ["Objective", "get_objective", "objective_names", "register_objective"]
