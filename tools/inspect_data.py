#!/usr/bin/env python
"""Show a preprocessed dataset: statistics, and rows decoded with their boundaries made visible.

Trained tokens (completions, or the loss mask of sft rows) are wrapped in ⟦ ⟧ (and coloured on a
terminal); the prompt is what comes before. ``--tokens`` lists every token of the row with its id
and whether it is trained.

Examples:
    python tools/inspect_data.py data/prefs                 # statistics
    python tools/inspect_data.py data/prefs --index 0 --index 7
    python tools/inspect_data.py data/sft --index 3 --tokens
    python tools/inspect_data.py data/prefs --layouts --micro-batch 8 --seq-length 2048

``--layouts`` (pairwise data) collates the pairs in every row layout (``padded``, ``packed``,
``prefix_shared``) and prints the token slots each costs and the speed-up they project over
``padded`` (:mod:`megatron.data.projection`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from megatron.data.indexed import DatasetError, IndexedDataset  # noqa: E402
from megatron.data.meta import field_prefix, read_meta  # noqa: E402
from megatron.tokenizer import TokenizerError, load_tokenizer  # noqa: E402

OPEN, CLOSE = "⟦", "⟧"
FIELDS = {
    "text": ("",),
    "sft": ("tokens", "loss_mask"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion"),
    "prompt": ("prompt",),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="dataset prefix (PREFIX.meta.json next to its files)")
    p.add_argument("--index", type=int, action="append", default=[], help="row to show (repeat)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one in meta.json)")
    p.add_argument("--tokens", action="store_true", help="also list the row's tokens one by one")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument(
        "--layouts", action="store_true", help="project the cost of each row layout (pairwise)"
    )
    p.add_argument("--micro-batch", type=int, default=8, help="pairs per micro-batch (--layouts)")
    p.add_argument("--seq-length", type=int, default=2048, help="data.seq_length (--layouts)")
    p.add_argument(
        "--max-rows", type=int, default=20_000, help="pairs to project, from the first (--layouts)"
    )
    return p.parse_args(argv)


def _pct(sizes: np.ndarray) -> str:
    if not sizes.size:
        return "n/a"
    p = np.percentile(sizes, [50, 90, 99], method="nearest")
    return f"mean={sizes.mean():.1f} p50={p[0]} p90={p[1]} p99={p[2]} max={sizes.max()}"


def _counts(by_reason: dict[str, int]) -> str:
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items()))
    return f"{sum(by_reason.values())}" + (f" ({detail})" if detail else "")


def statistics(prefix: str, meta: dict[str, Any], fields: dict[str, IndexedDataset]) -> list[str]:
    """Lines describing the dataset (from meta.json and the field indexes)."""
    tok = meta.get("tokenizer", {})
    lines = [
        f"dataset       {prefix}",
        f"format        {meta['format']}  ({meta['num_documents']} rows, {meta['num_tokens']} tokens)",
        f"tokenizer     {tok.get('name')} (vocab {tok.get('vocab_size')}, "
        f"hash {str(tok.get('vocab_hash'))[:12]})",
    ]
    if "chat_template" in meta:
        tpl = meta["chat_template"]
        lines.append(f"chat template {tpl['source']} (sha256 {str(tpl['sha256'])[:12]})")
    rows = meta.get("rows")
    if rows:
        lines.append(
            f"rows          read {rows['read']}, written {rows['written']}, skipped "
            f"{_counts(rows['skipped'])}, dropped {_counts(rows['dropped'])}, boundary-adjusted "
            f"{rows['boundary_adjusted']}, prompt-truncated {rows['prompt_truncated']}"
        )
    for name, ds in fields.items():
        if name not in ("loss_mask", "row"):
            lines.append(f"length        {name or 'document':<10} {_pct(ds.sizes)}")
    if "tokens" in fields and "loss_mask" in fields:
        trained = fields["loss_mask"].tokens.astype(np.int64).sum()
        lines.append(f"trained       {trained} of {fields['tokens'].num_tokens} tokens")
    if meta.get("scalars"):
        lines.append(f"scalars       {', '.join(meta['scalars'])}")
    return lines


class Painter:
    """Wraps trained text in markers (and colour when asked)."""

    def __init__(self, color: bool) -> None:
        self.color = color

    def trained(self, text: str) -> str:
        body = f"\033[1;32m{text}\033[0m" if self.color else text
        return f"{OPEN}{body}{CLOSE}"


def _runs(ids: np.ndarray, mask: np.ndarray) -> list[tuple[bool, np.ndarray]]:
    cuts = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    return [(bool(m[0]), i) for i, m in zip(np.split(ids, cuts), np.split(mask, cuts), strict=True)]


def show_row(
    meta: dict[str, Any], fields: dict[str, IndexedDataset], prefix: str, i: int, tok: Any,
    paint: Painter,
) -> list[str]:  # fmt: skip
    """Lines showing row ``i`` with its prompt/completion boundary and trained tokens."""
    fmt = meta["format"]
    lines = [f"--- row {i} of {meta['num_documents']} ({fmt}) " + _scalars(meta, prefix, i)]
    sequences: list[tuple[str, np.ndarray, np.ndarray]] = []
    if fmt in ("pairwise", "unpaired"):
        prompt = np.asarray(fields["prompt"][i])
        for name in FIELDS[fmt][1:]:
            comp = np.asarray(fields[name][i])
            mask = np.r_[np.zeros(prompt.size, bool), np.ones(comp.size, bool)]
            sequences.append((name, np.r_[prompt, comp], mask))
    elif fmt == "sft":
        ids = np.asarray(fields["tokens"][i])
        sequences.append(("tokens", ids, np.asarray(fields["loss_mask"][i]) > 0))
    else:
        ids = np.asarray(fields[FIELDS[fmt][0]][i])
        sequences.append((fmt, ids, np.zeros(ids.size, bool)))
    for name, ids, mask in sequences:
        lines.append(f"[{name}: {ids.size} tokens, {int(mask.sum())} trained]")
        text = "".join(
            paint.trained(tok.decode(part)) if m else tok.decode(part)
            for m, part in _runs(ids, mask)
        )
        lines.append(text)
    return lines


def _scalars(meta: dict[str, Any], prefix: str, i: int) -> str:
    values = [
        f"{n}={np.load(f'{prefix}.{n}.npy', mmap_mode='r')[i]}" for n in meta.get("scalars", [])
    ]
    return " ".join(values)


def token_table(
    fields: dict[str, IndexedDataset], meta: dict[str, Any], i: int, tok: Any
) -> list[str]:
    """One line per token of row ``i``'s first sequence: position, id, trained, text."""
    fmt = meta["format"]
    if fmt == "sft":
        ids, mask = np.asarray(fields["tokens"][i]), np.asarray(fields["loss_mask"][i]) > 0
    elif fmt in ("pairwise", "unpaired"):
        prompt, comp = np.asarray(fields["prompt"][i]), np.asarray(fields[FIELDS[fmt][1]][i])
        ids, mask = (
            np.r_[prompt, comp],
            np.r_[np.zeros(prompt.size, bool), np.ones(comp.size, bool)],
        )
    else:
        ids = np.asarray(fields[FIELDS[fmt][0]][i])
        mask = np.zeros(ids.size, bool)
    return [
        f"{k:>5} {int(t):>7} {'T' if m else '.'} {tok.decode([int(t)])!r}"
        for k, (t, m) in enumerate(zip(ids, mask, strict=True))
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        meta = read_meta(args.prefix)
        names = FIELDS.get(meta["format"], ())
        fields = {n: IndexedDataset(field_prefix(args.prefix, n)) for n in names}
        print("\n".join(statistics(args.prefix, meta, fields)))
        if args.layouts:
            print("\n".join(layout_projection(args, meta)))
        if not args.index:
            return 0
        tok = load_tokenizer(args.tokenizer or meta["tokenizer"]["name"])
    except (DatasetError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    for i in args.index:
        if not -meta["num_documents"] <= i < meta["num_documents"]:
            print(
                f"error: --index {i} out of range ({meta['num_documents']} rows)", file=sys.stderr
            )
            return 1
        i %= meta["num_documents"]
        print("\n".join(show_row(meta, fields, args.prefix, i, tok, Painter(color))))
        if args.tokens:
            print("\n".join(token_table(fields, meta, i, tok)))
    return 0


def layout_projection(args: argparse.Namespace, meta: dict[str, Any]) -> list[str]:
    """The ``--layouts`` table (pairwise datasets only)."""
    from megatron.data.datasets import PairwiseDataset
    from megatron.data.projection import format_projection, project_layouts

    if meta["format"] != "pairwise":
        raise DatasetError(
            f"--layouts projects pairwise datasets; {args.prefix} is {meta['format']}"
        )
    if args.micro_batch < 1 or args.seq_length < 2:
        raise DatasetError("--micro-batch must be >= 1 and --seq-length >= 2")
    ds = PairwiseDataset(args.prefix, args.seq_length, meta)
    costs = project_layouts(
        ds, ("padded", "packed", "prefix_shared", "prefix_shared_packed"), args.micro_batch,
        args.seq_length,
        max_rows=args.max_rows,
    )  # fmt: skip
    head = (
        f"layouts       first {min(len(ds), args.max_rows)} pairs, micro-batch "
        f"{args.micro_batch}, seq_length {args.seq_length}"
    )
    return [head, *format_projection(costs)]


if __name__ == "__main__":
    sys.exit(main())
