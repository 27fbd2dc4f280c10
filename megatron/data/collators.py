"""Collators: lists of samples -> :class:`~megatron.data.batch.Batch`, padded or packed.

Shapes: b rows, s row length, N ``num_sequences``, P pairs, n unpaired examples.

A micro-batch is first turned into an ordered list of *sequences* (token ids plus a per-token
"trained" flag), then laid out in rows:

* **padded**: one sequence per row, rows padded on the right to the longest sequence rounded up
  to ``pad_to_multiple_of`` (never to ``seq_length`` unless the data is that long);
* **packed**: sequences placed first-fit-decreasing into as few rows of capacity ``seq_length``
  as they need, balanced across those rows (several per row, never split; :func:`place_packed`),
  ``s`` = the fullest row rounded up likewise;
* **prefix_shared** (``pair`` kind only): each pair becomes one span ``[prompt | chosen |
  rejected]``, the prompt stored once; spans are packed first-fit-decreasing like sequences (see
  :meth:`Collator._prefix_shared` for the rows it writes).

Sequence order (``sequence_ids``): ``sequence`` kind (sft): sample ``i`` is sequence ``i``.
``pair``: chosen ``0..P-1`` then rejected ``P..2P-1`` (``prompt + chosen/rejected``; chosen
``i`` pairs with rejected ``P+i``), plus ``margin [P]`` when the data has one. ``unpaired``: the
``n`` examples then their KL sequences ``n..2n-1`` (``prompt_i + kl_completion_i``, cut on the
right to fit ``seq_length``; ``kl_start = n``) — or, with ``separate_kl``, the KL sequences as a
sub-batch of their own (``sub_batches[KL_SEQUENCES]``) — plus ``labels [n]`` bool. ``prompt``:
the prompts, nothing trained, plus ``prompt_lengths [n]``.

Every batch holds ``tokens``, ``targets``, ``sequence_ids`` ``[b, s]`` int64, ``loss_mask [b, s]``
float32, ``num_sequences`` and ``stats = {"packing_efficiency": real tokens / (b * s),
"real_tokens": real tokens}``; its ``layout`` has the positions and, for packed batches, the
segment ids (padded rows hold one right-padded sequence each, for which plain causal attention
is exact). For a sequence of ``m`` tokens at
row offset ``o``: ``targets[o + k] = x[k + 1]`` and ``loss_mask[o + k] = trained[k + 1]`` for
``k < m - 1``; its last position and padding have target 0 (a valid id) and mask 0. Positions
restart at 0 per sequence; ``segment_ids`` number a row's sequences 1, 2, ... (0 = padding), so
attention is causal within each sequence only (:class:`megatron.model.attention.SequenceLayout`:
SDPA with a block-diagonal mask, flash-attn varlen with ``cu_seqlens``).

The ``text`` format keeps :func:`collate_sequences` (full fixed windows, no segments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from megatron.data.batch import KL_SEQUENCES, Batch, ExtraTargets
from megatron.model.layout import SequenceLayout

Seq = tuple[np.ndarray, np.ndarray]
"""``(tokens int64 [m], trained bool [m])`` of one sequence."""


def collate_sequences(samples: list[dict[str, Any]]) -> Batch:
    """Stack fixed-length windows (the ``text`` format).

    Args:
        samples: dicts with ``tokens`` ``[s + 1]`` integer arrays and an optional ``loss_mask``
            ``[s + 1]`` (mask of the *target* tokens; position 0 is never a target).

    Returns:
        A batch of ``tokens [b, s]``, ``targets [b, s]`` int64 and ``loss_mask [b, s]`` float32
        in the causal layout (no ``sequence_ids``).
    """
    tokens = torch.from_numpy(np.stack([np.asarray(x["tokens"], dtype=np.int64) for x in samples]))
    if "loss_mask" in samples[0]:
        mask = torch.from_numpy(np.stack([np.asarray(x["loss_mask"]) for x in samples]))[:, 1:]
    else:
        mask = torch.ones(tokens.shape[0], tokens.shape[1] - 1)
    inputs = tokens[:, :-1]
    return Batch(
        tokens=inputs,
        targets=tokens[:, 1:],
        loss_mask=mask.float(),
        layout=SequenceLayout.causal(*inputs.shape),
    )


# ----------------------------------------------------------------------------- sequences per kind


def _with_prompt(prompt: np.ndarray, completion: np.ndarray) -> Seq:
    tokens = np.concatenate([prompt, completion])
    trained = np.zeros(tokens.size, dtype=bool)
    trained[prompt.size :] = True
    return tokens, trained


def _sequence_kind(samples: list[dict[str, Any]], seq_length: int) -> tuple[list[Seq], dict]:
    seqs = [(np.asarray(x["tokens"], np.int64), np.asarray(x["loss_mask"]) > 0) for x in samples]
    return seqs, {}


def _pair_kind(samples: list[dict[str, Any]], seq_length: int) -> tuple[list[Seq], dict]:
    chosen = [_with_prompt(x["prompt"], x["chosen"]) for x in samples]
    rejected = [_with_prompt(x["prompt"], x["rejected"]) for x in samples]
    extra = {}
    if all("margin" in x for x in samples):
        extra["margin"] = torch.tensor([x["margin"] for x in samples], dtype=torch.float32)
    return chosen + rejected, extra


def _unpaired_kind(
    samples: list[dict[str, Any]], seq_length: int, with_kl: bool = True
) -> tuple[list[Seq], dict]:
    real = [_with_prompt(x["prompt"], x["completion"]) for x in samples]
    kl = [
        _with_prompt(x["prompt"], x["kl_completion"][: max(1, seq_length - x["prompt"].size)])
        for x in samples
        if with_kl
    ]
    labels = torch.tensor([bool(x["label"]) for x in samples], dtype=torch.bool)
    return real + kl, {"labels": labels, "kl_start": len(samples)}


def _prompt_kind(samples: list[dict[str, Any]], seq_length: int) -> tuple[list[Seq], dict]:
    seqs = [(np.asarray(x["prompt"], np.int64), np.zeros(len(x["prompt"]), bool)) for x in samples]
    lengths = torch.tensor([s.size for s, _ in seqs], dtype=torch.int64)
    return seqs, {"prompt_lengths": lengths}


SEQUENCE_BUILDERS = {
    "sequence": _sequence_kind,
    "pair": _pair_kind,
    "unpaired": _unpaired_kind,
    "prompt": _prompt_kind,
}


# ----------------------------------------------------------------------------- layouts


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(max(cap, n), -(-n // multiple) * multiple)


def place_padded(lengths: Sequence[int], capacity: int) -> list[tuple[int, int]]:
    """``(row, offset)`` per sequence: sequence ``i`` alone in row ``i``."""
    return [(i, 0) for i in range(len(lengths))]


def place_packed(lengths: Sequence[int], capacity: int) -> list[tuple[int, int]]:
    """``(row, offset)`` per sequence: first-fit decreasing into as few rows as ``capacity``
    allows, then balanced — the smallest row capacity that still fits them in that many rows.

    why: the batch is ``rows x`` its fullest row, so FFD at ``capacity`` alone can pad a nearly
    empty last row to the full width (8 spans of 150 tokens at ``capacity`` 1024: rows of 1024
    and 176, 2048 slots; balanced: two rows of ~600, 1200 slots). Deterministic: ties in length
    keep input order; rows are numbered as they are opened.
    """
    where = _first_fit_decreasing(lengths, capacity)
    rows = 1 + max((r for r, _ in where), default=0)
    if rows == 1:
        return where
    lo, hi = max(max(lengths), -(-sum(lengths) // rows)), capacity
    while lo < hi:  # smallest capacity packing into `rows` rows (FFD is near-monotone in it)
        mid = (lo + hi) // 2
        if 1 + max(r for r, _ in _first_fit_decreasing(lengths, mid)) <= rows:
            hi = mid
        else:
            lo = mid + 1
    balanced = _first_fit_decreasing(lengths, lo)
    return balanced if 1 + max(r for r, _ in balanced) <= rows else where


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[tuple[int, int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fill: list[int] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in order:
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        where[i] = (row, fill[row])
        fill[row] += lengths[i]
    return where


LAYOUTS = {"padded": place_padded, "packed": place_packed}
PREFIX_SHARED = "prefix_shared"
"""The layout of ``pair`` batches that stores each prompt once (:meth:`Collator._prefix_shared`)."""
PREFIX_LAYOUTS = {PREFIX_SHARED: place_padded, "prefix_shared_packed": place_packed}
"""Prefix-shared layouts and where they put the spans: one per row (rows padded to the longest
span), or several per row of ``seq_length``. Packing the spans saves the padding's token slots
(linear layers, MLP, vocabulary projection) and costs no extra attention: the attention backends
attend per span (SDPA gathers the spans into their own rows, flash-attn uses varlen;
:mod:`megatron.model.layout`)."""


def default_layout(batch_kind: str) -> str:
    """What ``data.layout: auto`` resolves to.

    ``prefix_shared_packed`` for pair batches, with every attention backend: each prompt is
    computed once and the spans are packed, so no token slot is padding and attention costs only
    each span's own (the fastest layout measured for DPO on CPU, README "Objectives"; flash-attn
    realises it by varlen key gathering); likewise for ``prompt`` batches (online RL), whose
    sampled completions of one prompt share it in one span. ``padded`` for the other batch kinds
    (``data.layout: packed`` is available).
    """
    if batch_kind in ("pair", "prompt"):
        return "prefix_shared_packed"
    return "padded"


class Collator:
    """Builds a batch of one objective batch kind in one layout (see the module docstring).

    Args:
        kind: ``sequence``, ``pair``, ``unpaired`` or ``prompt``.
        layout: ``padded``, ``packed`` or ``prefix_shared`` (``pair`` only).
        seq_length: Row capacity (packed, prefix_shared) and the longest sequence accepted
            (prefix_shared: the longest ``prompt + chosen + rejected``).
        pad_to_multiple_of: Row length is rounded up to a multiple of this (capped at
            ``seq_length``).
        with_margin: ``pair`` batches carry ``margin`` (every dataset of the blend has one).
        with_kl: ``unpaired`` batches append the KL sequences (objectives that estimate KTO's KL
            reference point); without them ``num_sequences`` is ``n``.
        separate_kl: lay the KL sequences out as their own sub-batch ``batch["kl"]`` (same keys
            as a batch, ``num_sequences = n``; the main batch then holds the ``n`` examples),
            which the step forwards without gradient; otherwise they follow the examples.
        score_token: add ``score_index [N]`` int64, the flat index (``row * s + column``) of the
            token each sequence is scored at (a reward model's value head): ``"last"`` = its last
            token, ``"eos"`` = its last ``eos_id`` token (an error if it has none); ``None``: no
            ``score_index``.
        eos_id: the tokenizer's EOS id (``score_token="eos"``).
    """

    def __init__(
        self,
        kind: str,
        layout: str,
        seq_length: int,
        pad_to_multiple_of: int = 8,
        with_margin: bool = False,
        with_kl: bool = True,
        separate_kl: bool = False,
        score_token: str | None = None,
        eos_id: int | None = None,
    ) -> None:
        if kind not in SEQUENCE_BUILDERS:
            raise ValueError(
                f"unknown batch kind {kind!r}; choose from {sorted(SEQUENCE_BUILDERS)}"
            )
        if layout not in (*LAYOUTS, *PREFIX_LAYOUTS):
            choices = sorted((*LAYOUTS, *PREFIX_LAYOUTS))
            raise ValueError(f"unknown layout {layout!r}; choose from {choices}")
        if layout in PREFIX_LAYOUTS and kind != "pair":
            raise ValueError(f"layout {layout!r} needs pair batches, got kind {kind!r}")
        self.kind, self.layout = kind, layout
        self.seq_length, self.multiple = int(seq_length), int(pad_to_multiple_of)
        self.with_margin, self.with_kl, self.separate_kl = with_margin, with_kl, separate_kl
        if score_token not in (None, "last", "eos"):
            raise ValueError(f"score_token must be 'last', 'eos' or None, got {score_token!r}")
        if score_token == "eos" and eos_id is None:
            raise ValueError("score_token='eos' needs the tokenizer's eos_id")
        self.score_token, self.eos_id = score_token, eos_id

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        """Collate a micro-batch (see the module docstring for the keys and their meaning)."""
        if self.kind == "unpaired":
            seqs, extra = _unpaired_kind(samples, self.seq_length, self.with_kl)
        else:
            seqs, extra = SEQUENCE_BUILDERS[self.kind](samples, self.seq_length)
        if not self.with_margin:
            extra.pop("margin", None)
        side = None
        if self.kind == "unpaired" and self.with_kl and self.separate_kl:
            seqs, side = seqs[: len(samples)], seqs[len(samples) :]
        if self.layout in PREFIX_LAYOUTS:
            batch = self._prefix_shared(seqs, [len(x["prompt"]) for x in samples])
        else:
            batch = self._layout(seqs)
        if side is not None:
            kl = self._layout(side)
            batch.stats["real_tokens"] += kl.stats.pop("real_tokens")
            kl.stats.clear()
            batch.sub_batches[KL_SEQUENCES] = kl
        for key, value in extra.items():
            setattr(batch, key, value)
        return batch

    def _layout(self, seqs: list[Seq]) -> Batch:
        lengths = [t.size for t, _ in seqs]
        too_long = [i for i, n in enumerate(lengths) if n > self.seq_length]
        if too_long:
            raise ValueError(
                f"sequence {too_long[0]} of the micro-batch has {lengths[too_long[0]]} tokens, more "
                f"than data.seq_length {self.seq_length}"
            )
        where = LAYOUTS[self.layout](lengths, self.seq_length)
        batch = self._fill(seqs, where)
        if self.score_token is not None:
            width = batch.tokens.shape[1]
            starts = [row * width + o for row, o in where]
            batch.score_index = torch.tensor(
                [start + k for start, k in zip(starts, self._score_tokens(seqs), strict=True)],
                dtype=torch.int64,
            )
        return batch

    def _score_tokens(self, seqs: list[Seq]) -> list[int]:
        """Per sequence, the index (within the sequence) of the token it is scored at."""
        out = []
        for i, (tok, _) in enumerate(seqs):
            k = tok.size - 1
            if self.score_token == "eos":
                hits = np.flatnonzero(tok == self.eos_id)
                if not hits.size:
                    raise ValueError(
                        f"sequence {i} of the micro-batch holds no EOS token (id {self.eos_id}) to "
                        "score at; preprocess with an EOS-ending template or set "
                        "objective.score_token: last"
                    )
                k = int(hits[-1])
            out.append(k)
        return out

    def _fill(self, seqs: list[Seq], where: list[tuple[int, int]]) -> Batch:
        rows = 1 + max((r for r, _ in where), default=0)
        ends = [o + t.size for (_, o), (t, _) in zip(where, seqs, strict=True)]
        width = _round_up(max(ends, default=1), self.multiple, self.seq_length)
        tokens = np.zeros((rows, width), np.int64)
        targets = np.zeros((rows, width), np.int64)
        mask = np.zeros((rows, width), np.float32)
        positions = np.zeros((rows, width), np.int64)
        segments = np.zeros((rows, width), np.int64)
        seq_ids = np.full((rows, width), -1, np.int64)
        next_segment = [1] * rows
        for i, ((row, o), (tok, trained)) in enumerate(zip(where, seqs, strict=True)):
            m = tok.size
            tokens[row, o : o + m] = tok
            targets[row, o : o + m - 1] = tok[1:]
            mask[row, o : o + m - 1] = trained[1:]
            positions[row, o : o + m] = np.arange(m)
            segments[row, o : o + m] = next_segment[row]
            next_segment[row] += 1
            seq_ids[row, o : o + m - 1] = np.where(trained[1:], i, -1)
        real = sum(t.size for t, _ in seqs)
        # why: a padded row holds one right-padded sequence — plain causal attention is exact for
        # every real token, and it lets attention use its causal kernels instead of a mask.
        seg = None if self.layout == "padded" else torch.from_numpy(segments)
        return Batch(
            tokens=torch.from_numpy(tokens),
            targets=torch.from_numpy(targets),
            loss_mask=torch.from_numpy(mask),
            layout=SequenceLayout(torch.from_numpy(positions), seg),
            sequence_ids=torch.from_numpy(seq_ids),
            num_sequences=len(seqs),
            stats={"packing_efficiency": float(real / (rows * width)), "real_tokens": float(real)},
        )

    def _prefix_shared(self, seqs: list[Seq], prompt_lengths: list[int]) -> Batch:
        """Lay a pair batch out as spans ``[prompt | chosen | rejected]``, the prompt once.

        ``seqs`` are the pair kind's ``2P`` sequences (chosen ``i`` = ``prompt_i + chosen_i``,
        rejected ``P + i``), whose ``trained`` flags decide what is scored, so exactly the tokens
        the padded layout trains are trained. ``prefix_shared`` puts one span per row,
        ``prefix_shared_packed`` packs them first-fit-decreasing (:func:`place_packed`) into
        rows of ``seq_length`` (see :data:`PREFIX_LAYOUTS`). For pair ``i`` with a prompt of ``p``,
        a chosen of ``c`` and a rejected of ``r`` tokens at row offset ``o``:

        * ``segment_ids`` ``g, g + 1, g + 2`` (prompt, chosen, rejected; ``g`` = 1, 4, 7, ... per
          row) and ``prefix_ids`` ``0`` on the prompt, ``g`` on both completions, so chosen and
          rejected each attend to the prompt and themselves, never to each other;
        * positions ``0..p-1`` (prompt), ``p..p+c-1`` (chosen), ``p..p+r-1`` (rejected);
        * chosen reads its targets from the grid like a packed ``prompt + chosen``: the prompt's
          positions predict the next prompt token (mask 0), the prompt's last position predicts
          ``chosen[0]`` (sequence ``i``), chosen's last position nothing;
        * rejected's positions predict the next rejected token (sequence ``P + i``), its last
          nothing; ``rejected[0]`` is an extra target read at the prompt's last hidden state
          (``ExtraTargets(index=row * s + o + p - 1, targets=rejected[0], sequence_ids=P + i)``).

        An empty completion is scored on no token (as in the padded layout, where
        ``prompt + []`` has no target); an empty prompt leaves both completions' first tokens
        unscored (no hidden state precedes them, as in the padded layout). ``score_index`` is the
        flat index of each sequence's scored token (last, or last EOS) where it lies in the span;
        ``stats`` count each prompt once. ``extra_targets`` is always set (``k = 0`` when no pair
        has both a prompt and a rejected token).

        Raises:
            ValueError: a span longer than ``seq_length``, or a sequence without EOS with
                ``score_token="eos"``.
        """
        n_pairs = len(prompt_lengths)
        batch, columns = _prefix_rows(
            seqs,
            [[i, n_pairs + i] for i in range(n_pairs)],  # chosen i and rejected P + i
            prompt_lengths,
            self.layout,
            self.seq_length,
            self.multiple,
            lambda i, n: (
                f"pair {i} of the micro-batch has {n} tokens (prompt + chosen + rejected "
                f"in one data.layout: {self.layout} span)"
            ),
        )
        if self.score_token is not None:
            batch.score_index = torch.tensor(
                [int(columns[j][k]) for j, k in enumerate(self._score_tokens(seqs))],
                dtype=torch.int64,
            )
        return batch


def fill_prefix_groups(
    seqs: list[Seq],
    groups: list[list[int]],
    prompt_lengths: list[int],
    where: list[tuple[int, int]],
    rows: int,
    width: int,
) -> tuple[Batch, list[np.ndarray]]:
    """Rows of spans ``[prompt | completion_1 | ... | completion_n]``, each prompt stored once.

    Group ``g`` lists the sequences (indices into ``seqs``, each ``prompt + completion``) that
    share its first ``prompt_lengths[g]`` tokens; its span starts at ``where[g] = (row, offset)``.
    A pair batch's group is ``[chosen_i, rejected_i]`` (:meth:`Collator._prefix_shared` gives
    the layout in detail); online RL's are the completions of one prompt. In a span:

    * ``segment_ids`` ``g0`` on the prompt and ``g0 + 1 .. g0 + n`` on the completions, whose
      ``prefix_ids`` are ``g0``: each completion attends to the prompt and itself only;
    * positions ``0..p-1`` on the prompt and ``p..`` on each completion;
    * the group's first sequence reads its targets from the grid like a packed sequence (the
      prompt's last position predicts its first completion token); every other member's targets
      at prompt positions — its first completion token — are extra targets read at the prompt's
      last hidden state.

    Returns:
        The batch (no stats, no ``score_index``) and, per sequence, the flat ``row * s + column``
        index of each of its tokens.
    """
    tokens, targets, positions, segments, prefixes = (
        np.zeros((rows, width), np.int64) for _ in range(5)
    )
    seq_ids = np.full((rows, width), -1, np.int64)
    mask = np.zeros((rows, width), np.float32)
    flat_targets, flat_mask, flat_ids = (a.reshape(-1) for a in (targets, mask, seq_ids))
    columns: list[np.ndarray] = [np.zeros(0, np.int64)] * len(seqs)
    extra: dict[str, list[np.ndarray]] = {"index": [], "targets": [], "sequence_ids": []}
    next_segment = [1] * rows
    for members, (row, o), p in zip(groups, where, prompt_lengths, strict=True):
        first = seqs[members[0]][0]
        assert all((seqs[j][0][:p] == first[:p]).all() for j in members), (
            "a group shares its prompt"
        )
        lengths = [seqs[j][0].size - p for j in members]
        g = next_segment[row]
        next_segment[row] += 1 + len(members)
        start = row * width + o
        tokens[row, o : o + p] = first[:p]
        segments[row, o : o + p] = g
        positions[row, o : o + p] = np.arange(p)
        cursor = o + p
        for m, (j, c) in enumerate(zip(members, lengths, strict=True)):
            tokens[row, cursor : cursor + c] = seqs[j][0][p:]
            positions[row, cursor : cursor + c] = p + np.arange(c)
            segments[row, cursor : cursor + c] = g + 1 + m
            prefixes[row, cursor : cursor + c] = g
            own = row * width + cursor + np.arange(c)
            columns[j] = np.concatenate([start + np.arange(p), own])
            cursor += c
            tok, trained = seqs[j]
            at, tgt, tr = columns[j][:-1], tok[1:], trained[1:]
            # why: another member's target read at a prompt position (its first token) shares
            # that position with the first member's target, which owns the grid there: it
            # becomes an extra target.
            shared = (np.arange(at.size) < p) if m > 0 else np.zeros(at.size, bool)
            grid = ~shared
            flat_targets[at[grid]] = tgt[grid]
            flat_mask[at[grid]] = tr[grid]
            flat_ids[at[grid & tr]] = j
            keep = shared & tr
            extra["index"].append(at[keep])
            extra["targets"].append(tgt[keep])
            extra["sequence_ids"].append(np.full(int(keep.sum()), j))
    cat = lambda parts: torch.from_numpy(np.concatenate([np.zeros(0, np.int64), *parts]))  # noqa: E731
    batch = Batch(
        tokens=torch.from_numpy(tokens),
        targets=torch.from_numpy(targets),
        loss_mask=torch.from_numpy(mask),
        layout=SequenceLayout(*(torch.from_numpy(a) for a in (positions, segments, prefixes))),
        sequence_ids=torch.from_numpy(seq_ids),
        num_sequences=len(seqs),
        extra_targets=ExtraTargets(**{k: cat(v).long() for k, v in extra.items()}),
    )
    return batch, columns


def collate_prompt_groups(
    seqs: list[Seq],
    groups: list[list[int]],
    prompt_lengths: list[int],
    layout: str,
    seq_length: int,
    pad_to_multiple_of: int = 8,
) -> Batch:
    """Sequence ``j`` of ``seqs`` (``prompt + completion``, trained flags) laid out in
    prefix-shared spans, one per group of sequences sharing a prompt (:func:`fill_prefix_groups`):
    one span per row (``prefix_shared``) or packed (``prefix_shared_packed``). Online RL's
    completions of one prompt share its tokens this way.

    Raises:
        ValueError: a span longer than ``seq_length``, or an unknown layout.
    """
    if layout not in PREFIX_LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(PREFIX_LAYOUTS)}, got {layout!r}")
    batch, _ = _prefix_rows(
        seqs,
        groups,
        prompt_lengths,
        layout,
        seq_length,
        pad_to_multiple_of,
        lambda i, n: (
            f"group {i} of the micro-batch spans {n} tokens (its prompt once and its "
            f"{len(groups[i])} completions)"
        ),
    )
    return batch


def _prefix_rows(
    seqs: list[Seq],
    groups: list[list[int]],
    prompt_lengths: list[int],
    layout: str,
    seq_length: int,
    multiple: int,
    describe: Callable[[int, int], str],
) -> tuple[Batch, list[np.ndarray]]:
    """Place the groups' spans (one per row, or packed: :data:`PREFIX_LAYOUTS`), fill the rows
    (:func:`fill_prefix_groups`) and count their ``stats``; ``describe(i, tokens)`` names span
    ``i`` when it is longer than ``seq_length``."""
    spans = [
        p + sum(seqs[j][0].size - p for j in members)
        for members, p in zip(groups, prompt_lengths, strict=True)
    ]
    too_long = [i for i, n in enumerate(spans) if n > seq_length]
    if too_long:
        i = too_long[0]
        raise ValueError(f"{describe(i, spans[i])}, more than data.seq_length {seq_length}")
    where = PREFIX_LAYOUTS[layout](spans, seq_length)
    rows = 1 + max((r for r, _ in where), default=0)
    ends = [o + n for (_, o), n in zip(where, spans, strict=True)]
    width = _round_up(max(ends, default=1), multiple, seq_length)
    batch, columns = fill_prefix_groups(seqs, groups, prompt_lengths, where, rows, width)
    real = sum(spans)
    batch.stats = {"packing_efficiency": float(real / (rows * width)), "real_tokens": float(real)}
    return batch, columns
