"""Training objectives. Importing this package registers every built-in objective."""

from megatron.objectives import (  # noqa: F401  (each module registers its objective)
    cpo,
    dpo,
    grpo,
    kto,
    lm,
    orpo,
    reinforce,
    reward,
    rloo,
    sft,
    simpo,
)
from megatron.objectives.registry import (
    Objective,
    get_objective,
    objective_names,
    register_objective,
)

__all__ = ["Objective", "get_objective", "objective_names", "register_objective"]
