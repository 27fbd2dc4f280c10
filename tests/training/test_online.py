"""Online RL end to end: the same samples and losses on every grid, exact resume, learning.

A tiny GRPO run (4 prompts x G = 4 completions per rollout, 8 completions per optimizer step, so
two steps per rollout and the old policy's log-probs computed at the rollout; beta 0.04 with the
reference model) on prompts of a made-up task, rewarded by a function file:

* grid invariance: (TP, DP) in {(1,1), (2,1), (1,2), (2,2)} x ZeRO {0, 1, 3} sample exactly the
  same completions (each completion's tokens come from a stream seeded by its place in the
  rollout; a draw could only change if round-off moved a probability across the uniform number,
  ~1e-7 relative here) and give the same rewards, losses and gradient norms to fp32 round-off
  (tolerance derived next to ``RTOL``);
* resume: 4 steps straight equal 3 steps, a checkpoint in the middle of the second rollout (its
  completions held in ``source_state_rank{r}.pt``), and 1 resumed step, bit for bit;
* a reward with variance rises over a short run.

One spawned group per world size runs every grid of that size.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from tests.dist_pool import DistPool
from tests.helpers_runs import TINY_MODEL
from tests.rollout.test_reward_models import make_reward_model
from tests.training.helpers import write_config

# Tolerance, relative to max(|value|, 1), per step: the GRPO loss is a sum over ~100 completion
# tokens of ratio x advantage (both O(1)) over a token count; TP reorders the vocabulary
# log-sum-exp and the projections (~sqrt(h + V) u ~ 2e-6 per log-prob), DP/ZeRO the gradient
# sums (see test_grid_invariance.py: ~1e-6 for norms). 1e-5 keeps a margin; a wrong advantage,
# a misplaced token or another sample changes them by > 1e-2.
RTOL = 1e-5
GRIDS = {1: [(1, [0])], 2: [(2, [0, 1, 3]), (1, [0, 1, 3])], 4: [(2, [0, 1, 3])]}
TASK_WORDS = ["red", "blue", "green", "gold", "gray", "pink", "teal", "rose"]

REWARDS = '''
def digits(prompts, completions, **kwargs):
    """Fraction of digit characters: varies from the first step for a random model."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def exact(prompts, completions, answer, **kwargs):
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answer)]


def nan_on_gold(prompts, completions, **kwargs):
    """NaN for the prompts about gold: a broken reward function."""
    return [float("nan") if "gold" in p else 0.5 for p in prompts]
'''


def _rows(n: int, offset: int) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 7, (i * 3) % 5
        word = TASK_WORDS[i % len(TASK_WORDS)]
        rows.append({"prompt": f"{word} {a} plus {b} is", "answer": f" {a + b}"})
    return rows


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_tokenizer_dir):
    """The prompt data, the reward file, a reward model and the run config."""
    from megatron.data.preprocess import PreprocessOptions, preprocess

    tmp = tmp_path_factory.mktemp("online")
    for split, n, offset in (("train", 64, 0), ("valid", 8, 100)):
        raw = tmp / f"{split}.jsonl"
        raw.write_text("".join(json.dumps(r) + "\n" for r in _rows(n, offset)))
        options = PreprocessOptions(data_format="prompt", chat_template="none")
        preprocess([raw], tmp / split, tiny_tokenizer_dir, options)
    (tmp / "rewards.py").write_text(REWARDS)
    make_reward_model(tmp / "rm", tiny_tokenizer_dir)  # native TP=2 at tmp/rm/native
    cfg = {
        "model": {
            **TINY_MODEL,
            "vocab_size": 512,
            "make_vocab_size_divisible_by": 64,
            "max_position_embeddings": 64,
        },
        "data": {
            "train": [{"path": str(tmp / "train")}],
            "valid": [{"path": str(tmp / "valid")}],
            "tokenizer": str(tiny_tokenizer_dir),
            "seq_length": 40,
        },
        "objective": {"name": "grpo", "num_generations": 4, "beta": 0.04, "loss_type": "grpo"},
        "rollout": {"prompts_per_step": 4, "max_new_tokens": 12},
        "rewards": [{"function": "rewards.py:digits"}, {"function": "rewards.py:exact"}],
        "optimizer": {"lr": 3e-3},
        "schedule": {"style": "constant"},
        "training": {
            "train_iters": 4,
            "micro_batch_size": 2,
            "global_batch_size": 8,
            "seed": 5,
        },
        "logging": {"log_interval": 1, "dir": str(tmp / "logs")},
    }
    return tmp, str(write_config(tmp / "run.yml", cfg))


def _resume(rank, world, cfg_path, overrides, save):
    """3 steps saved in the middle of a rollout, then a new trainer resuming to step 4."""
    first = _train(
        rank,
        world,
        cfg_path,
        [
            *overrides,
            "training.train_iters=3",
            f"checkpoint.save={save}",
            "checkpoint.save_interval=3",
        ],
    )
    second = _train(rank, world, cfg_path, [*overrides, f"checkpoint.load={save}"])
    return first[0] + second[0], first[1] + second[1]


VARIANTS = {  # objective / reward variants (config changes), 2 steps each on 2 ranks
    "reward-model": {  # a native reward model on the policy's TP layout, beside a function
        "parallel": {"tensor": 2},
        "rewards": [{"model": "rm/native", "name": "rm"}, {"function": "rewards.py:digits"}],
    },
    "rloo": {"objective": {"name": "rloo", "num_generations": 4, "beta": 0.05}},
    "reinforce": {
        "parallel": {"tensor": 2},
        "objective": {"name": "reinforce", "num_generations": 4},
    },
    "grpo-mu2": {
        "parallel": {"zero_stage": 3},
        "objective": {"name": "grpo", "num_generations": 4, "num_iterations": 2},
    },
}


def _variant(tmp, cfg_path, name, changes):
    """The run config with whole sections replaced by ``changes`` (next to it: relative paths
    resolve alike), logging to ``logs-NAME``."""
    import yaml

    cfg = yaml.safe_load(open(cfg_path))
    cfg.update(changes)
    model = cfg["rewards"][0].get("model")
    if model:
        cfg["rewards"][0]["model"] = str(tmp / model)  # a model path is not config-relative
    cfg["logging"] = {"log_interval": 1, "dir": str(tmp / f"logs-{name}")}
    return str(write_config(tmp / f"{name}.yml", cfg))


def _train(rank, world, cfg_path, overrides):
    """Losses, grad norms and rewards per step, and every rollout's completions (this rank's)."""
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    samples = []

    def record(trainer, step):
        if trainer.source.position == 1:  # a rollout was just taken
            samples.append([c.tokens.tolist() for c in trainer.source.buffer])

    trainer = Trainer(load_config([cfg_path], overrides, world), hooks=[record])
    history = trainer.train()
    keys = ("loss", "grad_norm", "reward", "rewards/digits/mean", "kl")
    return [[h.get(k) for k in keys] for h in history], samples


@pytest.fixture(scope="module")
def grids(task):
    tmp, cfg_path = task
    results = {}
    for world, grids in GRIDS.items():
        pool = DistPool(world)
        try:
            for tp, zeros in grids:
                for zero in zeros:
                    ov = [
                        f"parallel.tensor={tp}",
                        f"parallel.zero_stage={zero}",
                        f"logging.dir={tmp}/logs-{world}-{tp}-{zero}",
                    ]
                    results[(tp, world // tp, zero)] = pool.run(_train, cfg_path, ov)
            if world == 2:
                ov = ["parallel.zero_stage=1", f"logging.dir={tmp}/logs-resume"]
                results["resume"] = pool.run(_resume, cfg_path, ov, str(tmp / "ckpt"))
                results["resume-straight"] = results[(1, 2, 1)]
                for name, changes in VARIANTS.items():
                    path = _variant(tmp, cfg_path, name, changes)
                    results[name] = pool.run(_train, path, ["training.train_iters=2"])
            if world == 2:
                bad = [f"rewards=[{{function: {tmp}/rewards.py:nan_on_gold}}]"]
                try:
                    pool.run(_train, cfg_path, [*bad, f"logging.dir={tmp}/logs-bad"])
                except RuntimeError as e:
                    results["bad-reward"] = str(e)
            if world == 1:
                ov = [
                    "training.train_iters=40",
                    f"rewards=[{{function: {tmp}/rewards.py:digits}}]",
                    f"logging.dir={tmp}/logs-learn",
                    "optimizer.lr=1e-2",
                    "objective.beta=0.0",
                ]
                results["learn"] = pool.run(_train, cfg_path, ov)
        finally:
            pool.close()
    return results


def _global_samples(per_rank, tp):
    """Every rollout's completions over the data-parallel ranks (TP rank 0 of each), in order."""
    replicas = [samples for rank, (_, samples) in enumerate(per_rank) if rank % tp == 0]
    return [[c for rep in replicas for c in rep[k]] for k in range(len(replicas[0]))]


def _close(a, b):
    return all(
        (x is None and y is None) or abs(x - y) <= RTOL * max(abs(y), 1.0)
        for x, y in zip(a, b, strict=True)
    )


def test_serial_run_samples_and_trains(grids):
    ((values, samples),) = grids[(1, 1, 0)]
    assert len(values) == 4 and len(samples) == 2  # two optimizer steps per rollout
    assert all(len(rollout) == 16 for rollout in samples)
    assert all(math.isfinite(v[0]) and v[1] > 0 for v in values)
    assert values[0][2] is not None and values[1][2] is None  # rollout metrics on its first step
    assert len({tuple(c) for c in samples[0]}) > 8  # sampled, not one completion repeated


@pytest.mark.parametrize(
    "tp,dp,zero",
    [(tp, dp, z) for tp, dp in [(2, 1), (1, 2), (2, 2)] for z in (0, 1, 3)],
)
def test_same_samples_and_losses_on_every_grid(grids, tp, dp, zero):
    ref_values, _ = grids[(1, 1, 0)][0]
    ref_samples = _global_samples(grids[(1, 1, 0)], 1)
    per_rank = grids[(tp, dp, zero)]
    assert _global_samples(per_rank, tp) == ref_samples, "different completions sampled"
    worst = 0.0
    for values, _ in per_rank:
        for step, (got, want) in enumerate(zip(values, ref_values, strict=True)):
            assert _close(got, want), f"step {step + 1}: {got} vs {want}"
            worst = max(
                [worst]
                + [abs(x - y) / max(abs(y), 1.0) for x, y in zip(got, want, strict=True) if y]
            )
    print(f"tp={tp} dp={dp} zero={zero}: max relative difference {worst:.1e}")  # -s


def test_resume_in_the_middle_of_a_rollout_is_exact(grids, task):
    tmp, _ = task
    assert (tmp / "ckpt" / "iter_0000003" / "source_state_rank1.pt").is_file()
    for (resumed, samples), (straight, ref_samples) in zip(
        grids["resume"], grids["resume-straight"], strict=True
    ):
        assert resumed == straight  # bit for bit, every step and metric
        assert samples == ref_samples  # the resumed step trained on the saved completions


def test_reward_rises(grids):
    """The digit-fraction reward (a random model emits ~1 % digits) over 40 steps = 20 rollouts of
    16 completions at lr 1e-2: measured 0.013 -> 0.78 (first and last rollout); the last 5
    rollouts' mean must beat the first 5's by 0.3."""
    ((values, _),) = grids["learn"]
    rewards = [v[2] for v in values if v[2] is not None]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, rewards


def _metrics(logs_dir):
    return [json.loads(x) for x in (logs_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_objective_and_reward_variants_train(grids, task, name):
    """Each variant runs two steps on 2 ranks with finite losses and its own metrics."""
    tmp, _ = task
    for values, _ in grids[name]:
        assert len(values) == 2 and all(math.isfinite(v[0]) and v[1] > 0 for v in values)
    first = next(r for r in _metrics(tmp / f"logs-{name}") if r["split"] == "train")
    keys = {
        "reward-model": {"rewards/rm/mean", "rewards/rm/std", "rewards/digits/mean"},
        "rloo": {"kl", "clip_ratio/low_min", "frac_reward_zero_std"},
        "reinforce": {"kl", "baseline", "entropy"},
        "reinforce-full-kl": {"kl", "baseline", "entropy"},
        "grpo-mu2": {"sampling/logp_difference/max", "clip_ratio/region_mean"},
    }[name]
    assert keys <= set(first), sorted(first)
    if name == "grpo-mu2":  # old log-probs computed at the rollout: the sampler's, to round-off
        assert first["sampling/logp_difference/max"] < 1e-4
    if name == "reinforce-full-kl":  # the policy is its reference at step 1: KL 0 exactly-ish
        assert 0 <= first["kl"] < 1e-5


def test_a_bad_reward_stops_every_rank_with_one_message(grids):
    """A reward function returning NaN on one data-parallel rank's rows: every rank stops with
    the same error naming the function and the prompt row (none waits in a collective)."""
    message = grids["bad-reward"]
    assert message.count("RewardError: reward function") == 2, message[-2000:]
    assert re.search(r"nan_on_gold' returned NaN for completion \d+ \(prompt row \d+\)", message)
