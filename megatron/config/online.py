"""Config sections of online RL: ``rollout:`` (how completions are sampled) and ``rewards:``.

``rewards:`` is the one top-level section that is a list (so ``rewards=[{function: f.py:name}]``
replaces it from the command line); each entry is a :class:`RewardSpec`. Cross-section rules
(prompts per step against the data-parallel size, tokens against the model's positions, ...) live
in :mod:`megatron.config.validate`; the loader resolves reward-function paths relative to the
file that names them and imports each function once, so a wrong path, name or signature is a
config error before any rank starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megatron.errors import FieldChecks


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Online RL's rollouts (objectives with ``prompt`` batches: ``grpo``, ``rloo``, ``reinforce``).

    Each rollout takes ``prompts_per_step`` prompts of ``data.train`` (split over the
    data-parallel ranks), samples ``objective.num_generations`` completions of each from the
    policy's own weights (the built-in decoder: same layers and TP shards as training, a
    preallocated key/value cache), scores them with ``rewards``, computes the old-policy and
    reference log-probs the objective needs and the advantages, and then trains on those
    completions as ordinary micro-batches: ``training.global_batch_size`` completions per optimizer
    step, ``prompts_per_step x num_generations / global_batch_size`` steps per pass, repeated
    ``objective.num_iterations`` times. ``training.train_iters`` counts optimizer steps.
    """

    prompts_per_step: int = 8
    """Prompts per rollout over all data-parallel ranks (must divide by the data-parallel size); each gets ``objective.num_generations`` completions."""
    max_new_tokens: int = 64
    """Most tokens sampled per completion (TRL's ``max_completion_length``); a completion that reaches it without EOS is *truncated* (``completions/clipped_ratio``)."""
    temperature: float = 1.0
    """Sampling temperature (> 0); the training forward scores tokens under ``softmax(logits / temperature)``, the distribution they were sampled from (as TRL does)."""
    top_k: int = 0
    """Sample among the k most probable tokens only; 0: no top-k."""
    top_p: float = 1.0
    """Nucleus sampling: the most probable tokens up to this probability mass, in (0, 1]; 1: off."""
    backend: Literal["builtin"] = "builtin"
    """Generation backend: ``builtin`` (the model's own decoder on its TP-sharded weights, no copy). The interface (:class:`megatron.rollout.backend.GenerationBackend`) admits a server backend (vLLM, SGLang) later."""
    generation_batch_size: int | None = None
    """Completions generated per call of the backend on each rank (bounds the key/value cache); null: all of the rank's completions of a rollout at once."""
    eval_prompts: int | None = None
    """Held-out prompts (``data.valid``) completed at each evaluation; null: all of them."""
    eval_temperature: float = 0.0
    """Sampling temperature of the evaluation's completions; 0: greedy."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        checks.at_least("prompts_per_step", 1)
        checks.at_least("max_new_tokens", 1)
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            checks.fail("temperature", f"must be a finite number > 0 (got {self.temperature})")
        checks.at_least("top_k", 0)
        if not 0 < self.top_p <= 1:
            checks.fail("top_p", f"must be in (0, 1] (got {self.top_p})")
        checks.at_least("generation_batch_size", 1)
        checks.at_least("eval_prompts", 1)
        if not (self.eval_temperature >= 0 and math.isfinite(self.eval_temperature)):
            checks.fail(
                "eval_temperature", f"must be a finite number >= 0 (got {self.eval_temperature})"
            )
        checks.done()


@dataclass(frozen=True, kw_only=True)
class RewardSpec:
    """One reward of online RL: a function or a reward model, and its weight.

    A *function* has TRL's signature, ``f(prompts, completions, **kwargs) -> list[float | None]``
    (``kwargs``: the prompt rows' extra columns and ``completion_ids``; ``None`` where it does not
    apply), so a TRL user's reward function runs unchanged. A *model* is a reward model trained by
    the ``reward`` objective (a native ``model.head: value`` checkpoint, run frozen on the
    policy's TP layout) or an exported Hugging Face ``*ForSequenceClassification`` directory; it
    scores each prompt + completion, re-tokenized with its own tokenizer. The total reward is the
    weighted sum over the rewards that apply.
    """

    function: str | None = None
    """``path/to/file.py:name`` (relative to the config file that names it) or ``package.module:name``."""
    model: str | None = None
    """A reward model: a native checkpoint directory (``latest``, or an ``iter_*`` directory) or an exported Hugging Face directory (relative to the working directory, like the config's other paths)."""
    weight: float = 1.0
    """Weight of this reward in the total."""
    name: str | None = None
    """Name in the metrics (``rewards/<name>/mean``); default: the function's name, or the model directory's name."""
    tokenizer: str | None = None
    """A reward model's tokenizer directory; default: its checkpoint's ``data.tokenizer`` (native) or the model directory (Hugging Face)."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        if (self.function is None) == (self.model is None):
            checks.fail("function", "give exactly one of function or model")
        if self.tokenizer is not None and self.model is None:
            checks.fail("tokenizer", "is only used with a reward model (model)")
        if self.name is not None and not self.name.strip():
            checks.fail("name", "must not be empty")
        checks.done()

    @property
    def label(self) -> str:
        """The name metrics use (see ``name``)."""
        if self.name:
            return self.name
        if self.function is not None:
            return self.function.rpartition(":")[2]
        return str(self.model).rstrip("/").rpartition("/")[2]
