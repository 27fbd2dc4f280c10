#!/usr/bin/env python
"""Our engine vs TRL 1.16's trainers (DPO, KTO, reward model): throughput, peak memory, losses.

``--objective dpo`` (default) compares with ``DPOTrainer``, ``kto`` with ``KTOTrainer`` (each pair
gives a desirable and an undesirable example: ``--format unpaired --from-pairwise`` on our side),
``reward`` with ``RewardTrainer`` (a random ``LlamaForSequenceClassification``, converted to our
``model.head: value``; no reference model). What is said below of DPO holds for the others with
their own batches: ``--batch`` pairs per step (DPO, reward) or ``--batch`` examples (KTO, each
with its KL sequence, which neither side trains through).

One run builds a random-weight tiny ``LlamaForCausalLM`` (saved with a byte-level BPE tokenizer and
a ChatML template), converts it to a native checkpoint with
:func:`megatron.ckpt.convert.convert_hf_to_native`, generates conversational preference pairs,
preprocesses them with our ``pairwise`` format, and trains both sides from the same weights on the
same pairs: same batch size (one micro-batch per step), steps, constant learning rate, AdamW
(betas 0.9/0.999, eps 1e-8, no weight decay), gradient clipping 1.0, beta, fp32 on CPU, the
reference being the initial policy. Each side trains in its own fresh subprocess (its
``ru_maxrss`` is its own peak): ours as ``Trainer(load_config(...)).train()`` after
``init_distributed()`` (single rank), TRL as ``DPOTrainer(...).train()`` with a reference model.

``--layout`` sets our side's ``data.layout`` (``auto``, the config default, which is
``prefix_shared_packed`` for these objectives; ``padded``; ``packed``; ``prefix_shared``: each
pair one span ``[prompt | chosen | rejected]``, the prompt computed once, one span per row;
``prefix_shared_packed``: those spans packed, attended per span); TRL always pads. ``--prompt-scale K`` (K > 0) prepends earlier user/assistant turns to every
prompt until its tokens are about K times its completions' mean (a multi-turn-like mix; the
generated prompts are already about 2x); 0 keeps the generated prompts. The header gives the
measured prompt / completion token ratio.

Reported: tokens/s (prompt + completion tokens of both sequences of every pair, whatever the
layout computes) and pairs/s over the whole ``train()`` call (set-up before it excluded; TRL's
``train()`` also builds its dataloader and prepares the model) and over steps 2..N only (steady
state; mean tokens per step, since the two sides draw the pairs in different orders), peak RSS of
each process, the ratios ours / TRL, and both loss curves; also the peak RSS reached before
``train()`` (model building and loading), the time from the child process's launch to the end
of its first optimizer step (imports, set-up, data, first step), and the reward accuracy on
``--held-out`` pairs drawn with another seed, evaluated after ``train()`` by each side's own
evaluation (``rewards/accuracies``, or ``accuracy`` for the reward model; not timed; not for
KTO). The two sides shuffle the pairs with different
generators, so per-step losses differ after the first step (the first step's loss is the same,
ln 2); with ``--pairs`` fewer than ``steps x batch`` the pairs repeat and both curves should fall
alike.

Example:
    python tools/bench/dpo_vs_trl.py --work /tmp/dpo_vs_trl --steps 40 --batch 4 --pairs 16
    python tools/bench/dpo_vs_trl.py --pairs 2000 --prompt-scale 4 --steps 30 --batch 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "tools" / "bench"))

from _sides import (  # noqa: E402
    GIB,
    child_result,
    maxrss_bytes,
    run_sides,
    step_timer,
    tiny_llama_config,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Write the HF model, its native conversion, the pairs and our preprocessed data."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megatron.ckpt.convert import convert_hf_to_native
    from megatron.data.preprocess import PreprocessOptions, preprocess
    from megatron.tokenizer.build import build_byte_level_bpe
    from tests.conftest import make_english_corpus
    from tests.data.conftest import conversational_pairs, write_jsonl

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tok_dir = build_byte_level_bpe(make_english_corpus(2000, seed=7), 512, work / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = CHATML
    cfg = tiny_llama_config(args, tok, max_positions=1024)
    torch.manual_seed(0)
    if args.objective == "reward":
        from transformers import LlamaForSequenceClassification

        cfg.num_labels = 1
        LlamaForSequenceClassification(cfg).float().save_pretrained(work / "hf")
    else:
        LlamaForCausalLM(cfg).float().save_pretrained(work / "hf")
    tok.save_pretrained(work / "hf")
    convert_hf_to_native(work / "hf", work / "native", tp_size=1, divisible_by=64)
    rows = conversational_pairs(args.pairs, seed=1)
    held_out = conversational_pairs(args.held_out, seed=2)
    if args.prompt_scale > 0:
        docs = make_english_corpus(40 * (len(rows) + len(held_out)), seed=5)
        _lengthen_prompts(rows + held_out, args.prompt_scale, docs, tok)
    write_jsonl(work / "pairs.jsonl", rows)
    write_jsonl(work / "held_out.jsonl", held_out)
    (work / "chatml.jinja").write_text(CHATML)
    options = PreprocessOptions(data_format="pairwise", chat_template=str(work / "chatml.jinja"))
    preprocess([work / "pairs.jsonl"], work / "pairs", work / "native" / "hf", options)
    preprocess([work / "held_out.jsonl"], work / "held_out", work / "native" / "hf", options)
    if args.objective == "kto":
        unpaired = PreprocessOptions(
            data_format="unpaired", chat_template=str(work / "chatml.jinja"), from_pairwise=True
        )
        preprocess([work / "pairs.jsonl"], work / "unpaired", work / "native" / "hf", unpaired)
    from megatron.data.indexed import IndexedDataset

    lens = {k: IndexedDataset(f"{work / 'pairs'}.{k}") for k in ("prompt", "chosen", "rejected")}
    n = range(len(rows))
    prompt = sum(len(lens["prompt"][i]) for i in n)
    completion = sum(len(lens["chosen"][i]) + len(lens["rejected"][i]) for i in n) / 2
    tokens = 2 * prompt + 2 * completion
    # every step draws `batch` pairs (KTO: `batch` examples, two per pair); epochs repeat the
    # dataset: mean tokens of the whole run
    pairs_per_step = args.batch / 2 if args.objective == "kto" else args.batch
    return {
        "pairs": len(rows),
        "tokens": tokens * args.steps * pairs_per_step / len(rows),
        "trained_pairs": args.steps * pairs_per_step,
        "prompt_ratio": prompt / completion,
        "prompt_mean": prompt / len(rows),
        "completion_mean": completion / len(rows),
    }


def _lengthen_prompts(rows: list[dict], scale: float, docs: list[str], tok: Any) -> None:
    """Prepend history turns (user/assistant, drawn from ``docs``) to every prompt, in place,
    until its tokens (ChatML applied) are about ``scale`` times its two completions' mean."""

    def count(msgs: list[dict], generation_prompt: bool = False) -> int:
        text = tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt
        )
        return len(tok(text, add_special_tokens=False).input_ids)

    turns = iter(docs)
    for row in rows:
        prompt = count(row["prompt"], generation_prompt=True)
        completion = sum(count(row["prompt"] + row[k]) - prompt for k in ("chosen", "rejected"))
        target = scale * completion / 2
        head = 1 if row["prompt"][0]["role"] == "system" else 0
        while True:  # add a user/assistant exchange while it brings the prompt nearer the target
            history = [
                {"role": "user", "content": next(turns)},
                {"role": "assistant", "content": next(turns)},
            ]
            longer = row["prompt"][:head] + history + row["prompt"][head:]
            if abs(count(longer, generation_prompt=True) - target) >= abs(prompt - target):
                break
            row["prompt"], prompt = longer, count(longer, generation_prompt=True)


OBJECTIVES = {
    "dpo": lambda a: {"name": "dpo", "beta": a.beta},
    "kto": lambda a: {"name": "kto", "beta": a.beta},
    "reward": lambda a: {"name": "reward", "use_margin": False},  # TRL gets no margins here
}


def run_ours(work: Path, args: argparse.Namespace) -> dict:
    """Train with our engine in this process (single rank)."""
    import yaml

    from megatron.config import load_config
    from megatron.training.distributed import init_distributed
    from megatron.training.trainer import Trainer

    held_out = args.objective != "kto"
    run = {
        "data": {
            "train": [{"path": str(work / ("unpaired" if args.objective == "kto" else "pairs"))}],
            **({"valid": [{"path": str(work / "held_out")}]} if held_out else {}),
            "seq_length": 1024,
            "tokenizer": str(work / "native" / "hf"),
            "layout": args.layout,
        },
        "objective": OBJECTIVES[args.objective](args),
        "checkpoint": {"load": str(work / "native"), "finetune": True},
        "optimizer": {"lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        "schedule": {"style": "constant"},
        "training": {
            "train_iters": args.steps,
            "micro_batch_size": args.batch,
            "global_batch_size": args.batch,
            "seed": 1,
            "gradient_clipping": 1.0,
            "eval_interval": None,  # evaluated once, after train() (below)
            "eval_iters": -(-args.held_out // args.batch),
        },
        "logging": {"log_interval": 1, "dir": str(work / "ours_logs")},
    }
    (work / "ours.yml").write_text(yaml.safe_dump(run))
    init_distributed()
    first_step: list[float] = []
    hook = lambda _trainer, step: first_step.append(time.time()) if step == 1 else None  # noqa: E731
    cfg = load_config([work / "native" / "model.yml", work / "ours.yml"], [], 1)
    trainer = Trainer(cfg, hooks=[hook])
    setup_rss = maxrss_bytes()
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    steps = [h["step_time"] for h in history]
    losses = [h["loss"] for h in history]
    accuracy = None
    if held_out:
        key = "accuracy" if args.objective == "reward" else "rewards/accuracies"
        accuracy = trainer.evaluate()[key]
    return _side_result(seconds, steps, losses, setup_rss, first_step[0], accuracy)


def _trl_trainer(work: Path, args: argparse.Namespace, common: dict, callbacks: list) -> Any:
    """TRL's trainer for ``args.objective`` on the same rows, models and settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (work / "held_out.jsonl").read_text().splitlines()]
    eval_cols = {k: [r[k] for r in held] for k in ("prompt", "chosen", "rejected")}
    load = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    tokenizer = AutoTokenizer.from_pretrained(work / "native" / "hf")
    if args.objective == "reward":
        from trl import RewardConfig, RewardTrainer

        cols = {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}
        model = AutoModelForSequenceClassification.from_pretrained(work / "hf", **load)
        return RewardTrainer(
            model=model,
            args=RewardConfig(**common, max_length=None),
            train_dataset=Dataset.from_dict(cols),
            eval_dataset=Dataset.from_dict(eval_cols),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    policy = AutoModelForCausalLM.from_pretrained(work / "hf", **load)
    reference = AutoModelForCausalLM.from_pretrained(work / "hf", **load)
    if args.objective == "kto":
        from trl.experimental.kto import KTOConfig, KTOTrainer

        examples = [
            {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in rows
            for side in ("chosen", "rejected")
        ]
        cols = {k: [e[k] for e in examples] for k in ("prompt", "completion", "label")}
        return KTOTrainer(
            model=policy,
            ref_model=reference,
            args=KTOConfig(**common, beta=args.beta, max_length=None),
            train_dataset=Dataset.from_dict(cols),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    from trl import DPOConfig, DPOTrainer

    cols = {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}
    return DPOTrainer(
        model=policy,
        ref_model=reference,
        args=DPOConfig(**common, beta=args.beta, max_length=None),
        train_dataset=Dataset.from_dict(cols),
        eval_dataset=Dataset.from_dict(eval_cols),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def run_trl(work: Path, args: argparse.Namespace) -> dict:
    """Train with TRL's trainer for ``args.objective`` in this process."""

    common = dict(
        output_dir=str(work / "trl_out"),
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        eval_strategy="no",  # evaluated once, after train() (below)
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 (autocast even on CPU)
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=1,
        dataloader_num_workers=0,
    )
    timer = step_timer()
    trainer = _trl_trainer(work, args, common, [timer])
    setup_rss = maxrss_bytes()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    accuracy = None
    if args.objective != "kto":
        key = "eval_accuracy" if args.objective == "reward" else "eval_rewards/accuracies"
        accuracy = trainer.evaluate()[key]
    return _side_result(
        seconds, timer.step_times, timer.losses, setup_rss, timer.first_step_at, accuracy
    )


def _side_result(
    seconds: float,
    step_times: list[float],
    losses: list[float],
    setup_rss: int,
    first_step_at: float,
    accuracy: float | None,
) -> dict:
    """One side's measurements; ``steady`` leaves out the first step (warm-up)."""
    return {
        "seconds": seconds,
        "steady": sum(step_times[1:]),
        "losses": losses,
        "setup": setup_rss,
        "first_step_at": first_step_at,
        "held_out_accuracy": accuracy,
    }


def child(side: str, work: Path, args: argparse.Namespace) -> None:
    """One side in this (fresh) process; prints its JSON result on the last line."""
    run = run_ours if side == "ours" else run_trl
    child_result(lambda: run(work, args), args.threads, args.launched_at)


def _accuracy(result: dict) -> str:
    acc = result.get("held_out_accuracy")
    return "-" if acc is None else f"{acc:.1%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="dpo")
    p.add_argument("--work", type=Path, default=Path("/tmp/dpo_vs_trl"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4, help="pairs per step (one micro-batch)")
    p.add_argument(
        "--pairs", type=int, default=16, help="distinct pairs (repeated in epochs: loss falls)"
    )
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, each side")
    p.add_argument(
        "--layout",
        choices=["auto", "padded", "packed", "prefix_shared", "prefix_shared_packed"],
        default="auto",  # DataConfig.layout's default
        help="our side's data.layout (TRL always pads)",
    )
    p.add_argument(
        "--prompt-scale",
        type=float,
        default=0.0,
        help="K > 0: prompts about K times their completions (prepended turns); 0: as generated",
    )
    p.add_argument(
        "--held-out",
        type=int,
        default=128,
        help="held-out pairs (other seed): reward accuracy after the run, both sides (not KTO)",
    )
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        child(args.side, args.work, args)
        return
    info = prepare(args.work, args)
    results = run_sides(__file__, sys.argv[1:], ROOT)
    print(
        f"tiny Llama h={args.hidden} L={args.layers} heads={args.heads}, vocab 512; "
        f"{info['pairs']} pairs, {info['tokens']:.0f} tokens in all; {args.objective}: {args.steps} steps x {args.batch} "
        f"{'examples' if args.objective == 'kto' else 'pairs'}; "
        f"lr {args.lr}, beta {args.beta}; fp32 CPU, {args.threads} threads per side"
    )
    print(
        f"our layout {args.layout}; prompt {info['prompt_mean']:.0f} tokens, completion "
        f"{info['completion_mean']:.0f} tokens (mean), prompt/completion "
        f"{info['prompt_ratio']:.2f} (--prompt-scale {args.prompt_scale:g})"
    )
    print(
        f"{'side':<6}{'train() s':>10}{'tokens/s':>10}{'steady s':>10}{'steady tok/s':>14}"
        f"{'peak RSS GiB':>14}{'after set-up':>14}{'s/step':>9}{'pairs/s':>9}{'steady pairs/s':>16}"
        f"{'to 1st step s':>15}{'held-out acc':>14}"
    )
    tps, steady, pps, steady_pps = {}, {}, {}, {}
    later = info["tokens"] * (args.steps - 1) / args.steps  # mean tokens of steps 2..N
    later_pairs = info["trained_pairs"] * (args.steps - 1) / args.steps
    for side, r in results.items():
        tps[side] = info["tokens"] / r["seconds"]
        steady[side] = later / r["steady"] if r["steady"] else float("nan")
        pps[side] = info["trained_pairs"] / r["seconds"]
        steady_pps[side] = later_pairs / r["steady"] if r["steady"] else float("nan")
        print(
            f"{side:<6}{r['seconds']:>10.2f}{tps[side]:>10.0f}{r['steady']:>10.2f}"
            f"{steady[side]:>14.0f}{r['maxrss'] / GIB:>14.3f}{r['setup'] / GIB:>14.3f}"
            f"{r['seconds'] / args.steps:>9.3f}{pps[side]:>9.2f}{steady_pps[side]:>16.2f}"
            f"{r['to_first_step']:>15.2f}{_accuracy(r):>14}"
        )
    ours, trl = results["ours"], results["trl"]
    print(
        f"ratio ours/TRL: tokens/s {tps['ours'] / tps['trl']:.2f} (whole train()), "
        f"{steady['ours'] / steady['trl']:.2f} (steps 2..N); "
        f"pairs/s {pps['ours'] / pps['trl']:.2f} (whole train()), "
        f"{steady_pps['ours'] / steady_pps['trl']:.2f} (steps 2..N); "
        f"peak RSS {ours['maxrss'] / trl['maxrss']:.2f}; "
        f"time to first step {ours['to_first_step'] / trl['to_first_step']:.2f}"
    )
    print("step  ours      TRL")
    for i in range(max(len(ours["losses"]), len(trl["losses"]))):
        a = f"{ours['losses'][i]:.4f}" if i < len(ours["losses"]) else "-"
        b = f"{trl['losses'][i]:.4f}" if i < len(trl["losses"]) else "-"
        print(f"{i + 1:>4}  {a:<8}  {b}")


if __name__ == "__main__":
    main()
