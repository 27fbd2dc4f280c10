"""Turn Hugging Face chat/preference datasets into this project's JSONL input rows.

    python post-training/data/hf_to_jsonl.py --dataset HuggingFaceH4/ultrafeedback_binarized \
        --split train_prefs --kind pairwise --out data/uf_train.jsonl
    python post-training/data/hf_to_jsonl.py --dataset HuggingFaceH4/ultrachat_200k \
        --split train_sft --kind sft --out data/ultrachat_train.jsonl
    python post-training/data/hf_to_jsonl.py --dataset openai/gsm8k --name main \
        --split train --kind gsm8k --out data/gsm8k_train.jsonl

``--dataset`` is a hub name (read through the user's ``datasets`` cache / network) or a local
``datasets.save_to_disk`` directory. Row shapes written:

* ``pairwise`` (UltraFeedback-binarized style: ``chosen`` / ``rejected`` are whole conversations
  sharing every turn but the last): ``{"prompt": [turns...], "chosen": [last turn],
  "rejected": [last turn], "margin": score_chosen - score_rejected}`` (margin only when both
  scores exist). Pairs whose conversations differ before the last turn, or whose completions are
  identical, are skipped and counted.
* ``sft`` (UltraChat style): ``{"messages": [...]}``.
* ``gsm8k`` (GSM8K: ``question``, ``answer`` ending in ``#### <number>``): ``{"prompt": [user
  turn: the question and how to give the answer], "answer": "<number>"}``, a ``prompt`` row for
  online RL whose ``answer`` column reaches the reward function (commas dropped from the number).

The output is then tokenized by ``tools/preprocess_data.py --format pairwise|sft|prompt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any


def pairwise_row(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """One UltraFeedback-binarized row -> (our row, None) or (None, reason skipped)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, list) or not isinstance(rejected, list) or not chosen or not rejected:
        return None, "chosen/rejected are not message lists"
    if chosen[:-1] != rejected[:-1]:
        return None, "chosen and rejected differ before the last turn"
    if chosen[-1] == rejected[-1]:
        return None, "chosen == rejected"
    out: dict[str, Any] = {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    if not out["prompt"] and isinstance(row.get("prompt"), str):
        out["prompt"] = [{"role": "user", "content": row["prompt"]}]
    sc, sr = row.get("score_chosen"), row.get("score_rejected")
    if isinstance(sc, int | float) and isinstance(sr, int | float):
        out["margin"] = float(sc) - float(sr)
    return out, None


def sft_row(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """One UltraChat-style row -> (our row, None) or (None, reason skipped)."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, "no messages list"
    if not any(m.get("role") == "assistant" for m in messages):
        return None, "no assistant turn"
    return {"messages": messages}, None


GSM8K_INSTRUCTION = (
    "Solve the problem step by step. Give the final answer as a number on the last line, "
    'after "####".'
)
"""Appended to each GSM8K question (the reward reads the number after ``####``)."""


def gsm8k_row(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """One GSM8K row -> (a prompt row with its final answer, None) or (None, reason skipped)."""
    question, solution = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not isinstance(solution, str):
        return None, "no question/answer strings"
    if "####" not in solution:
        return None, "answer has no '####' final number"
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    content = f"{question.strip()}\n\n{GSM8K_INSTRUCTION}"
    return {"prompt": [{"role": "user", "content": content}], "answer": final}, None


CONVERTERS = {"pairwise": pairwise_row, "sft": sft_row, "gsm8k": gsm8k_row}


def convert(rows: Iterable[dict[str, Any]], kind: str) -> Iterator[tuple[dict | None, str | None]]:
    convert_row = CONVERTERS[kind]
    for row in rows:
        yield convert_row(row)


def _load(dataset: str, split: str, name: str | None = None) -> Any:
    import datasets

    if os.path.isdir(dataset):
        ds = datasets.load_from_disk(dataset)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(dataset, name, split=split)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", required=True, help="hub name or save_to_disk directory")
    ap.add_argument("--split", required=True)
    ap.add_argument("--name", help="the dataset's configuration name (openai/gsm8k: main)")
    ap.add_argument("--kind", choices=sorted(CONVERTERS), required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    skipped: Counter[str] = Counter()
    written = 0
    tmp = f"{args.out}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for out, reason in convert(_load(args.dataset, args.split, args.name), args.kind):
            if out is None:
                skipped[reason] += 1
                continue
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
            written += 1
    os.replace(tmp, args.out)
    print(
        f"wrote {written} rows to {args.out}; skipped {sum(skipped.values())}"
        + "".join(f"\n  {n} {r}" for r, n in skipped.most_common())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
