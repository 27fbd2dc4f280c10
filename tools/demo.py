"""The embedded post-training demo (``make demo``): data -> tokenizer -> SFT -> DPO -> generation.

Everything it needs ships in the repository:

1. a deterministic generator of small checkable tasks on digit lists (``sort``, ``reverse``,
   ``inc``: add one to each digit). Each example is a prompt, its correct answer and a subtly
   corrupted answer (two neighbouring elements swapped, or one element off by one);
2. a byte-level BPE tokenizer trained on them (:func:`megatron.tokenizer.build.build_byte_level_bpe`);
3. ``tools/preprocess_data.py``: prompt/completion rows (``--format sft``) and
   prompt/chosen/rejected pairs (``--format pairwise``), each with a held-out split whose prompts
   never occur in training;
   The same pairs also make unpaired rows for KTO (``--format unpaired --from-pairwise``: the
   correct answer desirable, the corrupted one undesirable);
4. SFT from scratch (``configs/demo/sft.yml``), then from the SFT checkpoint
   (``checkpoint.load=SFT checkpoint.finetune=true``; the frozen reference is that same
   checkpoint): DPO (``configs/demo/dpo.yml``), KTO (``configs/demo/kto.yml``) and a reward model
   (``configs/demo/rm.yml``, ``model.head: value``), all on CPU through ``deepy.py``;
5. GRPO (``configs/demo/grpo.yml``, online RL) from an *early* SFT checkpoint, one that answers
   only part of the prompts right, so that the sampled completions' exact-match reward varies:
   the policy samples its own completions of the task prompts (``--format prompt`` rows whose
   ``answer`` column reaches the reward function ``configs/demo/rewards.py``);
6. greedy generation with the key/value cache (:func:`megatron.model.generate.greedy_generate`) on
   held-out prompts, from the SFT, DPO, KTO and GRPO weights, scored by exact match;
7. evaluation: lm-evaluation-harness's ``configs/eval`` tasks (the first 64 held-out examples as
   multiple choice, generation and rolling log-likelihood) on each generating checkpoint, as
   ``tools/eval.py`` runs them (the SFT run also evaluates them on its live weights:
   ``training.eval_tasks`` in ``configs/demo/sft.yml``); the reward model on the held-out pairs in
   RewardBench's format (``tools/rewardbench.py``); ``STAGE/metrics.png`` of every stage
   (``tools/plot_metrics.py``).

It prints, before and after each stage, the held-out metrics the trainer logs: DPO's implicit
reward accuracy and margin (``rewards/accuracies``, ``rewards/margins``), KTO's implicit rewards of
the correct and corrupted answers and its KL estimate, the reward model's pairwise ``accuracy``
(the target is >= 90 %) and ``margin``, GRPO's held-out greedy exact match and mean reward
(its evaluation) and sampled reward; and the exact-match accuracy of the generating models.
``--quick`` runs the same pipeline at a reduced size (used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZER_VOCAB = 384  # == model.vocab_size in configs/demo/model.yml
TASKS = ("sort", "reverse", "inc")


@dataclass(frozen=True)
class Example:
    """One checkable task: ``prompt`` + ``answer`` is right, ``prompt`` + ``corrupted`` is not."""

    prompt: str
    answer: str
    corrupted: str


@dataclass(frozen=True)
class Sizes:
    """How much data and how many optimizer steps one demo run uses."""

    sft_rows: int
    dpo_pairs: int
    valid_rows: int
    sft_iters: int
    dpo_iters: int
    dpo_eval_interval: int
    kto_iters: int
    rm_iters: int
    grpo_start: int
    grpo_iters: int
    generations: int
    eval_limit: int | None


FULL = Sizes(
    sft_rows=24_000,
    dpo_pairs=8_000,
    valid_rows=256,
    sft_iters=1500,
    dpo_iters=300,
    dpo_eval_interval=50,
    kto_iters=300,
    rm_iters=900,
    grpo_start=300,
    grpo_iters=150,
    generations=256,
    eval_limit=None,
)
QUICK = Sizes(
    sft_rows=2_000,
    dpo_pairs=1_000,
    valid_rows=64,
    sft_iters=60,
    dpo_iters=30,
    dpo_eval_interval=30,
    kto_iters=20,
    rm_iters=30,
    grpo_start=30,
    grpo_iters=6,
    generations=12,
    eval_limit=12,
)


def _digits(xs: list[int]) -> str:
    return "".join(f" {x}" for x in xs)


def _corrupt(answer: list[int], rng: random.Random, swap: bool) -> list[int]:
    """``answer`` with two neighbouring unequal elements swapped, or one element off by one."""
    bad = list(answer)
    pairs = [i for i in range(len(bad) - 1) if bad[i] != bad[i + 1]]
    if swap and pairs:
        i = rng.choice(pairs)
        bad[i], bad[i + 1] = bad[i + 1], bad[i]
    else:
        i = rng.randrange(len(bad))
        bad[i] = bad[i] + 1 if bad[i] < 9 and (bad[i] == 0 or rng.random() < 0.5) else bad[i] - 1
    return bad


def make_example(rng: random.Random) -> Example:
    """A random task: ``sort``/``reverse`` corrupt by a swap, ``inc`` by an off-by-one digit."""
    kind = rng.choice(TASKS)
    n = rng.randrange(3, 7)
    if kind == "inc":
        xs = [rng.randrange(9) for _ in range(n)]
        answer = [x + 1 for x in xs]
    else:
        xs = [rng.randrange(10) for _ in range(n)]
        while kind == "reverse" and xs == xs[::-1]:
            xs = [rng.randrange(10) for _ in range(n)]
        answer = sorted(xs) if kind == "sort" else xs[::-1]
        if len(set(answer)) == 1:  # nothing to swap: fall back to an off-by-one
            return Example(
                f"{kind}{_digits(xs)}:", _digits(answer), _digits(_corrupt(answer, rng, False))
            )
    bad = _corrupt(answer, rng, swap=kind != "inc")
    return Example(f"{kind}{_digits(xs)}:", _digits(answer), _digits(bad))


def make_splits(sizes: Sizes, seed: int = 1) -> dict[str, list[Example]]:
    """Disjoint train and held-out examples (no held-out prompt occurs in training)."""
    rng = random.Random(seed)
    valid: dict[str, Example] = {}
    while len(valid) < sizes.valid_rows:
        ex = make_example(rng)
        valid.setdefault(ex.prompt, ex)
    train = []
    while len(train) < sizes.sft_rows + sizes.dpo_pairs:
        ex = make_example(rng)
        if ex.prompt not in valid:
            train.append(ex)
    return {
        "sft_train": train[: sizes.sft_rows],
        "dpo_train": train[sizes.sft_rows :],
        "valid": list(valid.values()),
    }


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(cmd: list[str]) -> float:
    """Run ``cmd`` from the repository root; returns its wall time (printed too)."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    seconds = time.time() - start
    print(f"({seconds:.0f} s)", flush=True)
    return seconds


def preprocess(out: Path, name: str, fmt: str, source: str | None = None) -> None:
    """``tools/preprocess_data.py --format FMT`` on one split, run in-process (no start-up cost).

    ``source`` names another raw file to read (pairwise rows for ``--format unpaired
    --from-pairwise``); default ``name``.
    """
    from megatron.data.preprocess import PreprocessOptions
    from megatron.data.preprocess import preprocess as tokenize

    raw = out / "raw" / f"{source or name}.jsonl"
    from_pairwise = fmt == "unpaired"
    args = [
        f"--format {fmt}",
        *(["--from-pairwise"] if from_pairwise else []),
        f"--input {raw}",
        f"--output-prefix {out / 'data' / name}",
        f"--tokenizer {out / 'tokenizer'}",
        "--chat-template none",
    ]
    print("$ tools/preprocess_data.py " + " ".join(args), flush=True)
    options = PreprocessOptions(data_format=fmt, chat_template="none", from_pairwise=from_pairwise)
    summary = tokenize([raw], out / "data" / name, out / "tokenizer", options)
    print(summary.format().splitlines()[1], flush=True)  # "rows written N"


def prepare_data(out: Path, sizes: Sizes) -> dict[str, list[Example]]:
    """Generate the task rows, build the tokenizer, preprocess every split."""
    from megatron.tokenizer.build import build_byte_level_bpe

    splits = make_splits(sizes)
    sft = lambda exs: [{"prompt": e.prompt, "completion": e.answer} for e in exs]  # noqa: E731
    pair = lambda exs: [  # noqa: E731
        {"prompt": e.prompt, "chosen": e.answer, "rejected": e.corrupted} for e in exs
    ]
    write_jsonl(out / "raw" / "sft_train.jsonl", sft(splits["sft_train"]))
    write_jsonl(out / "raw" / "sft_valid.jsonl", sft(splits["valid"]))
    write_jsonl(out / "raw" / "dpo_train.jsonl", pair(splits["dpo_train"]))
    write_jsonl(out / "raw" / "dpo_valid.jsonl", pair(splits["valid"]))
    # why: the reward model learns to check answers from many more pairs than DPO needs (8k
    # pairs: 85 % held-out accuracy, 32k: 95 %); the SFT prompts' corrupted answers supply them.
    write_jsonl(out / "raw" / "rm_train.jsonl", pair(splits["sft_train"] + splits["dpo_train"]))
    # GRPO's prompts keep their answer as an extra column, for the reward function
    task = lambda exs: [{"prompt": e.prompt, "answer": e.answer} for e in exs]  # noqa: E731
    write_jsonl(out / "raw" / "grpo_train.jsonl", task(splits["dpo_train"]))
    write_jsonl(out / "raw" / "grpo_valid.jsonl", task(splits["valid"]))
    corpus = [e.prompt + e.answer for e in splits["sft_train"]]
    build_byte_level_bpe(corpus, TOKENIZER_VOCAB, out / "tokenizer")
    for name in ("sft_train", "sft_valid"):
        preprocess(out, name, "sft")
    for name in ("dpo_train", "dpo_valid", "rm_train"):
        preprocess(out, name, "pairwise")
    for split in ("train", "valid"):
        preprocess(out, f"kto_{split}", "unpaired", source=f"dpo_{split}")
    for name in ("grpo_train", "grpo_valid"):
        preprocess(out, name, "prompt")
    return splits


STAGE_DATA = {
    "sft": ("sft_train", "sft_valid"),
    "dpo": ("dpo_train", "dpo_valid"),
    "kto": ("kto_train", "kto_valid"),
    "rm": ("rm_train", "dpo_valid"),
    "grpo": ("grpo_train", "grpo_valid"),
}
"""Training and held-out dataset of each stage (the reward model is validated on DPO's pairs)."""


def train_stage(out: Path, stage: str, iters: int, eval_interval: int, extra: list[str]) -> None:
    """Launch one training stage through ``deepy.py`` with the demo's paths filled in."""
    train, valid = STAGE_DATA[stage]
    overrides = [
        f"data.train=[{{path: {out / 'data' / train}}}]",
        f"data.valid=[{{path: {out / 'data' / valid}}}]",
        f"data.tokenizer={out / 'tokenizer'}",
        f"checkpoint.save={out / stage}",
        f"logging.dir={out / stage}",
        f"training.train_iters={iters}",
        f"training.eval_interval={eval_interval}",
        f"checkpoint.save_interval={iters}",
        *extra,
    ]
    files = ["configs/demo/model.yml", f"configs/demo/{stage}.yml"]
    run([sys.executable, "deepy.py", "train.py", *files, *overrides])


def valid_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The validation records of a run's ``metrics.jsonl``, in step order."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "valid"]


def load_policy(run_dir: Path) -> Any:
    """The trained weights of ``run_dir`` (its ``latest`` checkpoint) in a TP=1 :class:`GPTModel`."""
    from megatron.ckpt.native import load_tp_shard
    from megatron.config import load_config
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState
    from megatron.training.checkpointing import resolve_checkpoint

    root, tag = resolve_checkpoint(run_dir)
    cfg = load_config([root / tag / "config.yml"], resolved=True).model  # the run's own config
    model = GPTModel(cfg, ParallelState.single())
    model.load_state_dict(load_tp_shard(root / tag, cfg, 1, 0))
    return model.eval()


def exact_match(run_dir: Path, tokenizer_dir: Path, examples: list[Example]) -> dict[str, Any]:
    """Greedy (KV-cached) completions of held-out prompts and their exact-match accuracy."""
    from megatron.model.generate import greedy_generate
    from megatron.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    model = load_policy(run_dir)
    outputs = []
    for ex in examples:
        ids = greedy_generate(model, tok.encode(ex.prompt), 24, eos_id=tok.eos_id)
        text = tok.decode(ids, skip_special_tokens=True)
        outputs.append({"prompt": ex.prompt, "answer": ex.answer, "output": text})
    correct = [o["output"] == o["answer"] for o in outputs]
    per_task = {}
    for task in TASKS:
        hits = [c for c, o in zip(correct, outputs, strict=True) if o["prompt"].startswith(task)]
        per_task[task] = sum(hits) / max(len(hits), 1)
    return {"exact_match": sum(correct) / len(outputs), "per_task": per_task, "outputs": outputs}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def report(out: Path, gens: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Print and return the before/after numbers (also written to ``OUT/results.json``).

    ``gens`` maps each generating stage (``sft``, ``dpo``, ``kto``, ``grpo``) to
    :func:`exact_match`'s result.
    """
    sft_valid = valid_metrics(out / "sft")
    dpo_valid, kto_valid, rm_valid = (valid_metrics(out / s) for s in ("dpo", "kto", "rm"))
    kto_keys = ("step", "loss", "kl", "rewards/chosen", "rewards/rejected")
    result = {
        "sft_valid_nll": [(r["step"], r["sft/nll"]) for r in sft_valid],
        "dpo_valid": [
            {k: r[k] for k in ("step", "loss", "rewards/accuracies", "rewards/margins")}
            for r in dpo_valid
        ],
        "reward_accuracy_before": dpo_valid[0]["rewards/accuracies"],
        "reward_accuracy_after": dpo_valid[-1]["rewards/accuracies"],
        "reward_margin_before": dpo_valid[0]["rewards/margins"],
        "reward_margin_after": dpo_valid[-1]["rewards/margins"],
        "kto_valid": [{k: r[k] for k in kto_keys if k in r} for r in kto_valid],
        "rm_valid": [
            {k: r[k] for k in ("step", "loss", "accuracy", "margin", "reward_std")}
            for r in rm_valid
        ],
        "rm_accuracy_before": rm_valid[0]["accuracy"],
        "rm_accuracy_after": rm_valid[-1]["accuracy"],
        **{f"exact_match_{stage}": g["exact_match"] for stage, g in gens.items()},
        "exact_match_per_task": {stage: g["per_task"] for stage, g in gens.items()},
    }
    print("\n=== held-out results ===")
    nll = " -> ".join(f"{v:.3f} (step {s})" for s, v in result["sft_valid_nll"])
    print(f"SFT  completion NLL: {nll}")
    for r in result["dpo_valid"]:
        print(
            f"DPO  step {r['step']:>4}: loss {r['loss']:.4f}  rewards/accuracies "
            f"{_pct(r['rewards/accuracies'])}  rewards/margins {r['rewards/margins']:+.4f}"
        )
    print(
        f"DPO reward accuracy {_pct(result['reward_accuracy_before'])} -> "
        f"{_pct(result['reward_accuracy_after'])}, margin "
        f"{result['reward_margin_before']:+.4f} -> {result['reward_margin_after']:+.4f}"
    )
    for r in result["kto_valid"]:
        print(
            f"KTO  step {r['step']:>4}: loss {r['loss']:.4f}  kl {r['kl']:.4f}  rewards/chosen "
            f"{r.get('rewards/chosen', 0):+.4f}  rewards/rejected {r.get('rewards/rejected', 0):+.4f}"
        )
    for r in result["rm_valid"]:
        print(
            f"RM   step {r['step']:>4}: loss {r['loss']:.4f}  accuracy {_pct(r['accuracy'])}  "
            f"margin {r['margin']:+.4f}  reward_std {r['reward_std']:.4f}"
        )
    print(
        f"reward model held-out accuracy {_pct(result['rm_accuracy_before'])} -> "
        f"{_pct(result['rm_accuracy_after'])} (target >= 90 %)"
    )
    result.update(grpo_report(out))
    n = len(gens["sft"]["outputs"])
    print(
        f"greedy exact match on {n} held-out prompts (GRPO started from SFT step "
        f"{result['grpo_start']}): "
        + " -> ".join(f"{stage.upper()} {_pct(g['exact_match'])}" for stage, g in gens.items())
    )
    for task in TASKS:
        print(
            f"  {task:<8} "
            + "  ".join(f"{stage.upper()} {_pct(g['per_task'][task])}" for stage, g in gens.items())
        )
    mark = lambda o: "ok" if o["output"] == o["answer"] else "WRONG"  # noqa: E731
    for i in range(min(6, n)):
        row = gens["sft"]["outputs"][i]
        outs = "  ".join(
            f"{stage.upper()} {g['outputs'][i]['output']!r} [{mark(g['outputs'][i])}]"
            for stage, g in gens.items()
        )
        print(f"  {row['prompt']!r:<24} want {row['answer']!r:<14} {outs}")
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def grpo_report(out: Path) -> dict[str, Any]:
    """GRPO's held-out evaluations (greedy, scored by the rewards) and sampled training reward."""
    valid = valid_metrics(out / "grpo")
    rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["reward"] for r in rows if r["split"] == "train" and "reward" in r]
    from megatron.config import read_config_file

    config = read_config_file(next((out / "grpo").glob("iter_*/config.yml")))
    start = Path(config["checkpoint"]["load"]).name  # iter_0000300: the SFT step
    result = {
        "grpo_start": int(start.removeprefix("iter_")),
        "grpo_valid": [
            {k: r[k] for k in ("step", "reward", "rewards/exact_match/mean") if k in r}
            for r in valid
        ],
        "grpo_exact_match_before": valid[0]["rewards/exact_match/mean"],
        "grpo_exact_match_after": valid[-1]["rewards/exact_match/mean"],
        "grpo_reward_before": valid[0]["reward"],
        "grpo_reward_after": valid[-1]["reward"],
        "grpo_sampled_reward_first": sampled[0],
        "grpo_sampled_reward_last": sampled[-1],
    }
    for r in result["grpo_valid"]:
        print(
            f"GRPO step {r['step']:>4}: held-out greedy exact match "
            f"{_pct(r['rewards/exact_match/mean'])}  reward {r['reward']:.3f}"
        )
    print(
        f"GRPO held-out greedy exact match {_pct(result['grpo_exact_match_before'])} -> "
        f"{_pct(result['grpo_exact_match_after'])}, mean reward "
        f"{result['grpo_reward_before']:.3f} -> {result['grpo_reward_after']:.3f} (sampled in "
        f"training: {sampled[0]:.3f} -> {sampled[-1]:.3f}), from SFT step {result['grpo_start']}"
    )
    return result


def run_demo(out: Path, sizes: Sizes, nproc: int = 2) -> dict[str, Any]:
    """The whole pipeline into ``out`` (cleared first); returns the numbers :func:`report` prints."""
    start = time.time()
    # why: the demo regenerates its own output; a stale checkpoint would (rightly) be refused.
    shutil.rmtree(out, ignore_errors=True)
    splits = prepare_data(out, sizes)
    launcher = [f"launcher.nproc_per_node={nproc}"]
    # the SFT run also keeps the early checkpoint GRPO starts from
    keep_early = [f"checkpoint.save_interval={sizes.grpo_start}", *launcher]
    # the SFT run evaluates the configs/eval tasks on its live weights (training.eval_tasks)
    if sizes.eval_limit:
        keep_early.append(f"training.eval_tasks_limit={sizes.eval_limit}")
    train_stage(out, "sft", sizes.sft_iters, sizes.sft_iters // 2, keep_early)
    from_sft = [f"checkpoint.load={out / 'sft'}", "checkpoint.finetune=true", *launcher]
    train_stage(out, "dpo", sizes.dpo_iters, sizes.dpo_eval_interval, from_sft)
    train_stage(out, "kto", sizes.kto_iters, sizes.kto_iters // 2, from_sft)
    train_stage(out, "rm", sizes.rm_iters, sizes.rm_iters // 3, from_sft)
    early = out / "sft" / f"iter_{sizes.grpo_start:07d}"
    from_early = [f"checkpoint.load={early}", "checkpoint.finetune=true", *launcher]
    train_stage(out, "grpo", sizes.grpo_iters, sizes.grpo_iters // 2, from_early)
    held_out = splits["valid"][: sizes.generations]
    gens = {stage: exact_match(out / stage, out / "tokenizer", held_out) for stage in GENERATORS}
    result = report(out, gens)
    result["lm_eval"] = lm_eval_table(out, sizes.eval_limit)
    result["rewardbench"] = rewardbench_report(out, splits["valid"])
    result["plots"] = [str(p) for p in plot_stages(out)]
    result["wall_s"] = time.time() - start
    print(
        f"\ntotal {result['wall_s']:.0f} s; outputs in {out} (results.json, sft/, dpo/, kto/, rm/, "
        "grpo/, each with metrics.png)"
    )
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


GENERATORS = ("sft", "dpo", "kto", "grpo")
"""Stages whose policies generate (the reward model has no lm head)."""
EVAL_TASKS = ("demo_mc", "demo_gen", "demo_text")
"""The lm-eval tasks of ``configs/eval`` (the demo's first 64 held-out examples)."""
EVAL_METRICS = ("demo_mc/acc", "demo_gen/exact_match", "demo_text/bits_per_byte")
"""The metrics of the printed lm-eval table (``eval/<task>/<metric>``)."""
PLOTS = {
    "sft": ("loss", "eval/demo_mc/acc", "eval/demo_gen/exact_match"),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins"),
    "kto": ("loss", "kl", "rewards/chosen", "rewards/rejected"),
    "rm": ("loss", "accuracy", "margin"),
    "grpo": ("reward", "rewards/exact_match/mean", "completions/mean_length"),
}
"""The curves drawn for each stage (those the run logged)."""


def lm_eval_table(out: Path, limit: int | None) -> dict[str, dict[str, float]]:
    """lm-eval's ``configs/eval`` tasks on each generating stage's native checkpoint (what
    ``tools/eval.py --ckpt OUT/STAGE --tasks demo_mc,demo_gen,demo_text`` prints), in-process."""
    import torch

    from megatron.evaluation.harness import ShardedLM
    from megatron.evaluation.runner import (
        flat_metrics,
        load_eval_model,
        load_hf_tokenizer,
        run_tasks,
    )
    from megatron.parallel import ParallelState

    state, table = ParallelState.single(), {}
    tokenizer = load_hf_tokenizer(out / "tokenizer")
    for stage in GENERATORS:
        limit_flag = f" --limit {limit}" if limit else ""
        print(f"$ tools/eval.py --ckpt {out / stage} --tasks {','.join(EVAL_TASKS)}{limit_flag}")
        model, _, _ = load_eval_model(out / stage, state, torch.device("cpu"))
        lm = ShardedLM(model, tokenizer, state, batch_size=16, progress=False)
        results = run_tasks(lm, list(EVAL_TASKS), limit=limit, bootstrap_iters=0)
        table[stage] = {k.removeprefix("eval/"): v for k, v in flat_metrics(results).items()}
    print("\n=== lm-eval on the held-out tasks (configs/eval; native checkpoints) ===")
    print(f"{'task/metric':<26}" + "".join(f"{s.upper():>9}" for s in GENERATORS))
    for metric in EVAL_METRICS:
        print(f"{metric:<26}" + "".join(f"{table[s][metric]:>9.3f}" for s in GENERATORS))
    return table


def rewardbench_report(out: Path, examples: list[Example]) -> dict[str, Any]:
    """The reward model on the held-out pairs as a RewardBench-format file (subset = task), as
    ``tools/rewardbench.py --model OUT/rm --input OUT/raw/rewardbench.jsonl`` reports it."""
    from megatron.rewardbench import format_table, read_pairs, score_pairs, summarize, tally
    from megatron.scoring import RowEncoder, open_reward_model
    from megatron.tokenizer import load_tokenizer

    rows = [
        {"prompt": e.prompt, "chosen": e.answer, "rejected": e.corrupted,
         "subset": e.prompt.split()[0]}
        for e in examples
    ]  # fmt: skip
    path = write_jsonl(out / "raw" / "rewardbench.jsonl", rows)
    cmd = f"$ tools/rewardbench.py --model {out / 'rm'} --input {path} --chat-template none"
    print(cmd)
    pairs = read_pairs(path)
    encoder = RowEncoder(load_tokenizer(out / "tokenizer"), "none")
    chosen, rejected = score_pairs(open_reward_model(out / "rm"), encoder, pairs, 32)
    report = summarize(tally(pairs, chosen, rejected))
    print(format_table(report))
    return report


def plot_stages(out: Path) -> list[Path]:
    """``OUT/STAGE/metrics.png`` of every stage (``tools/plot_metrics.py``); none without
    matplotlib (the ``plot`` extra)."""
    from megatron.plotting import PlotError, available_metrics, plot_runs, read_metrics

    written = []
    for stage, wanted in PLOTS.items():
        known = set(available_metrics([read_metrics(out / stage)]))
        try:
            path = plot_runs(
                [out / stage], [m for m in wanted if m in known], out / stage / "metrics.png"
            )
        except PlotError as e:
            print(f"no plots: {e}")
            return written
        written.append(path)
    print("plots: " + ", ".join(str(p.relative_to(out)) for p in written))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    ap.add_argument("--quick", action="store_true", help="reduced size (the test suite's run)")
    ap.add_argument("--nproc", type=int, default=2, help="data-parallel CPU ranks (default 2)")
    args = ap.parse_args(argv)
    run_demo((ROOT / args.out).resolve(), QUICK if args.quick else FULL, args.nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
