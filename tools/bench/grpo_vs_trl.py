#!/usr/bin/env python
"""Our GRPO vs TRL 1.16's ``GRPOTrainer``: seconds per step (rollout + update) and peak memory.

One run builds a random-weight tiny ``LlamaForCausalLM`` (saved with a byte-level BPE tokenizer),
converts it to a native checkpoint with :func:`megatron.ckpt.convert.convert_hf_to_native`,
writes prompts of the demo's checkable tasks (``sort 4 1 7:``; ``tools/demo.py``) with their
answers, preprocesses them with our ``--format prompt``, and trains both sides from the same
weights on the same prompts with the same reward function: per step ``--prompts`` prompts x
``--generations`` completions (one rollout = one optimizer step: TRL's default
``steps_per_generation`` = gradient accumulation = 1, ours ``prompts_per_step x G =
global_batch_size``), sampled at temperature 1 (no top-k/top-p) up to ``--max-new-tokens`` or EOS,
``loss_type: dapo``, ``scale_rewards: group``, beta 0 (no reference model), epsilon 0.2, constant
learning rate, AdamW (betas 0.9/0.999, no weight decay), gradient clipping 1.0, fp32 on CPU,
``--threads`` torch threads per side. TRL generates with transformers' ``generate`` (no vLLM);
ours with the policy's own decoder. Each side trains in its own fresh subprocess, one after the
other (its ``ru_maxrss`` is its own peak).

``--few-shot K`` puts K solved examples before every prompt (a few-shot prefix: long prompts, as
in RL with system prompts or worked examples); the header gives the mean prompt length.

The reward is the fraction of digit characters in the completion (a random model emits a few; it
varies within a group, so both sides take real gradient steps); ``--reward exact`` uses exact
match of the answer instead (zero for a random model: no gradient, generation still timed).

Reported per side: seconds per step over the whole ``train()`` and over steps 2..N (steady
state), completion tokens sampled per step (a random model rarely emits EOS: both sides sample
close to ``--max-new-tokens`` per completion, checked in the output), peak RSS and the time from
the child's launch to the end of its first step; then the ratios ours / TRL. Ours also reports
its split of each step into rollout (generation, rewards) and update.

Example:
    python tools/bench/grpo_vs_trl.py --steps 8 --prompts 8 --generations 8 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "tools" / "bench"))
sys.path.insert(0, str(ROOT / "tools"))

from _sides import GIB, child_result, run_sides, step_timer, tiny_llama_config  # noqa: E402

REWARDS = '''
def digits(prompts, completions, **kwargs):
    """Fraction of digit characters in each completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def exact(prompts, completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]
'''


def prepare(work: Path, args: argparse.Namespace) -> None:
    """The HF model and tokenizer, its native conversion, the prompts and our prompt dataset."""
    import torch
    from demo import make_example
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megatron.ckpt.convert import convert_hf_to_native
    from megatron.data.preprocess import PreprocessOptions, preprocess
    from megatron.tokenizer.build import build_byte_level_bpe

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rng = random.Random(1)
    examples = [make_example(rng) for _ in range(max(args.prompts * args.steps, 64))]
    corpus = [e.prompt + e.answer for e in examples] * 4
    tok_dir = build_byte_level_bpe(corpus, 384, work / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = tiny_llama_config(args, tok, max_positions=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    # only the tokenizer's EOS ends a completion (TRL stops at every id listed here)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(work / "hf")
    tok.save_pretrained(work / "hf")
    convert_hf_to_native(work / "hf", work / "native", tp_size=1, divisible_by=64)
    shots = [make_example(random.Random(7)) for _ in range(args.few_shot)]
    prefix = "".join(f"{e.prompt}{e.answer}\n" for e in shots)
    rows = [{"prompt": prefix + e.prompt, "answer": e.answer} for e in examples]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "rewards.py").write_text(REWARDS)
    options = PreprocessOptions(data_format="prompt", chat_template="none")
    preprocess([work / "prompts.jsonl"], work / "prompts", work / "native" / "hf", options)


def run_ours(work: Path, args: argparse.Namespace) -> dict:
    """Train with our engine in this process (single rank)."""
    import yaml

    from megatron.config import load_config
    from megatron.training.distributed import init_distributed
    from megatron.training.trainer import Trainer

    completions = args.prompts * args.generations
    run = {
        "data": {
            "train": [{"path": str(work / "prompts")}],
            "seq_length": 256,
            "tokenizer": str(work / "native" / "hf"),
        },
        "objective": {"name": "grpo", "num_generations": args.generations, "loss_type": "dapo"},
        "rollout": {
            "prompts_per_step": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
        },
        "rewards": [{"function": f"{work / 'rewards.py'}:{args.reward}"}],
        "checkpoint": {"load": str(work / "native"), "finetune": True},
        "optimizer": {"lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        "schedule": {"style": "constant"},
        "training": {
            "train_iters": args.steps,
            "micro_batch_size": completions,
            "global_batch_size": completions,
            "seed": 1,
            "gradient_clipping": 1.0,
        },
        "logging": {"log_interval": 1, "dir": str(work / "ours_logs")},
    }
    (work / "ours.yml").write_text(yaml.safe_dump(run))
    init_distributed()
    first_step: list[float] = []
    hook = lambda _trainer, step: first_step.append(time.time()) if step == 1 else None  # noqa: E731
    cfg = load_config([work / "native" / "model.yml", work / "ours.yml"], [], 1)
    trainer = Trainer(cfg, hooks=[hook])
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "step_times": [h["step_time"] for h in history],
        "rollout_s": [h["time/rollout"] for h in history],
        "update_s": [h["time/update"] for h in history],
        "completion_tokens": [h["completions/mean_length"] * completions for h in history],
        "rewards": [h["reward"] for h in history],
        "first_step_at": first_step[0],
    }


def run_trl(work: Path, args: argparse.Namespace) -> dict:
    """Train with TRL's ``GRPOTrainer`` in this process."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(work))
    import rewards

    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "answer")})
    model = AutoModelForCausalLM.from_pretrained(
        work / "hf", dtype=torch.float32, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(work / "hf", padding_side="left")
    config = GRPOConfig(
        output_dir=str(work / "trl_out"),
        per_device_train_batch_size=args.prompts * args.generations,
        gradient_accumulation_steps=1,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 even on CPU
        gradient_checkpointing=False,  # GRPOConfig turns it on by default
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    timer = step_timer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=getattr(rewards, args.reward),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    history = [x for x in trainer.state.log_history if "completions/mean_length" in x]
    completions = args.prompts * args.generations
    return {
        "seconds": seconds,
        "step_times": timer.step_times,
        "completion_tokens": [h["completions/mean_length"] * completions for h in history],
        "rewards": [h["reward"] for h in history],
        "first_step_at": timer.first_step_at,
    }


def child(side: str, work: Path, args: argparse.Namespace) -> None:
    """One side in this (fresh) process; prints its JSON result on the last line."""
    run = run_ours if side == "ours" else run_trl
    child_result(lambda: run(work, args), args.threads, args.launched_at)


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/grpo_vs_trl"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--reward", choices=["digits", "exact"], default="digits")
    p.add_argument("--few-shot", type=int, default=0, help="solved examples before each prompt")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, each side")
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        child(args.side, args.work, args)
        return
    prepare(args.work, args)
    results = run_sides(__file__, sys.argv[1:], ROOT)
    n = args.prompts * args.generations
    from megatron.data.indexed import IndexedDataset

    prompts = IndexedDataset(f"{args.work / 'prompts'}.prompt")
    prompt_mean = sum(len(prompts[i]) for i in range(len(prompts))) / len(prompts)
    print(
        f"tiny Llama h={args.hidden} L={args.layers} heads={args.heads}, vocab 384; GRPO "
        f"{args.steps} steps x {args.prompts} prompts x G={args.generations} = {n} completions "
        f"of <= {args.max_new_tokens} tokens per step (prompts {prompt_mean:.0f} tokens, "
        f"--few-shot {args.few_shot}); reward {args.reward}; lr {args.lr}; fp32 CPU, "
        f"{args.threads} threads per side"
    )
    print(
        f"{'side':<6}{'s/step':>9}{'steady s/step':>15}{'tokens/step':>13}{'peak RSS GiB':>14}"
        f"{'to 1st step s':>15}{'reward first->last':>21}"
    )
    per, steady = {}, {}
    for side, r in results.items():
        per[side] = r["seconds"] / args.steps
        steady[side] = _mean(r["step_times"][1:])
        rewards = f"{r['rewards'][0]:.3f} -> {r['rewards'][-1]:.3f}"
        print(
            f"{side:<6}{per[side]:>9.3f}{steady[side]:>15.3f}{_mean(r['completion_tokens']):>13.0f}"
            f"{r['maxrss'] / GIB:>14.3f}{r['to_first_step']:>15.2f}{rewards:>21}"
        )
    ours, trl = results["ours"], results["trl"]
    print(
        f"ours per step (steps 2..N): rollout {_mean(ours['rollout_s'][1:]):.3f} s, update "
        f"{_mean(ours['update_s'][1:]):.3f} s"
    )
    print(
        f"speed ours/TRL: {per['trl'] / per['ours']:.2f}x (whole train()), "
        f"{steady['trl'] / steady['ours']:.2f}x (steps 2..N); peak RSS ours/TRL "
        f"{ours['maxrss'] / trl['maxrss']:.2f}; time to first step "
        f"{ours['to_first_step'] / trl['to_first_step']:.2f}"
    )


if __name__ == "__main__":
    main()
