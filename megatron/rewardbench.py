"""RewardBench evaluation of reward models (the library behind ``tools/rewardbench.py``).

RewardBench (Lambert et al. 2024, "RewardBench: Evaluating Reward Models for Language Modeling",
arXiv:2403.13787) asks whether a reward model scores a verified better answer ("chosen") above a
worse one ("rejected") for the same prompt, over 23 subsets grouped into four sections. The rules
below were read from its reference code, github.com/allenai/reward-bench at commit ``05a9005``
(2026-01-31), and are taken as facts from it:

* ``rewardbench/constants.py``: :data:`SUBSET_MAPPING` (section -> subsets) and
  :data:`EXAMPLE_COUNTS` (each subset's weight), copied here.
* ``scripts/run_rm.py`` and ``rewardbench/rewardbench.py``: a pair is correct when
  ``score(chosen) > score(rejected)``, strictly: **a tie counts as wrong** (so a constant model
  scores 0, not 50 %). A subset's accuracy is its fraction of correct pairs.
* ``rewardbench/utils.py`` ``calculate_scores_per_section``: a section's score is the mean of the
  accuracies of its subsets present in the results, weighted by :data:`EXAMPLE_COUNTS` -- the
  benchmark's fixed counts, not the number of rows in the file. For Reasoning the weight of
  ``math-prm`` is 984 = 6 x 164 although the subset has 447 rows ("upweighting to be equal to
  code"), so with every subset present Reasoning = (math-prm + mean of the six ``hep-*``) / 2.
* ``analysis/get_benchmark_results.py`` ``get_average_over_rewardbench`` (the leaderboard
  table): "Prior Sets" is the unweighted mean of the accuracies of :data:`PRIOR_SETS` that are
  present (``np.nanmean``), and the average is the weighted mean of the four section scores
  (weight 2 each) and Prior Sets (weight 1), a missing value masked out. Without prior-set
  results that is the plain mean of the four sections.

Departures (each deliberate):

* A section none of whose subsets is in the input: ``calculate_scores_per_section`` reports 0;
  here it is ``None`` ("absent"). ``score`` is the mean over the sections present and the report
  is marked ``partial`` whenever any of the 23 subsets is missing (a missing section included),
  since such a score cannot be compared with published ones.
* Two overall numbers: ``score`` (the mean of the four sections, what the core set alone gives)
  and, only when prior-set subsets are present, ``score_with_prior_sets`` (the 2:1 weighting
  above). Other subsets (e.g. ``anthropic_harmless`` or ``mtbench_human`` of the prior-sets
  release, or one's own) get per-subset accuracies and are listed as ``other``, in no score.

How a pair is scored. RewardBench renders each side as the conversation
``[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]`` with the
tokenizer's chat template (``prepare_dialogue_from_tokenizer`` in ``rewardbench/utils.py``; a
message-list prompt, as in the prior sets, is followed by the answer). Here, with a chat template
(a Jinja file or the tokenizer's), each side is that conversation given to
:class:`~megatron.scoring.RowEncoder` as ``{"messages": [...]}``, so it is tokenized exactly as
pairwise preprocessing tokenizes a conversational pair's ``prompt + chosen``. With
``chat_template="none"`` each side is ``{"prompt": prompt, "completion": answer}``: plain text,
EOS appended, as pairwise training on string rows; RewardBench has no such mode (it falls back to
a FastChat template), it is for reward models trained on plain strings. When no template is
available and ``"none"`` was not asked for, :func:`pair_form` fails rather than silently
choosing. Token ids follow this repository's preprocessing, so a third-party model's scores can
differ slightly from RewardBench's own harness (which tokenizes the rendered text through a
transformers pipeline, special-token handling included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.data.formats.base import check_text, require
from megatron.data.formats.prompt import read_prompt
from megatron.data.indexed import DatasetError
from megatron.data.sources import RowError, decode_record, iter_rows
from megatron.scoring import HFRewardModel, NativeRewardModel, RowEncoder, ScoreError, score_records

SUBSET_MAPPING: dict[str, tuple[str, ...]] = {
    "Chat": (
        "alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy",
        "mt-bench-med",
    ),
    "Chat Hard": (
        "mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut", "llmbar-adver-manual",
    ),
    "Safety": (
        "refusals-dangerous", "refusals-offensive", "xstest-should-refuse",
        "xstest-should-respond", "donotanswer",
    ),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}  # fmt: skip
"""Section -> its subsets (``SUBSET_MAPPING`` of ``rewardbench/constants.py``)."""

EXAMPLE_COUNTS: dict[str, int] = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100,
    "refusals-offensive": 100, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164,
    "hep-rust": 164,
}  # fmt: skip
"""Subset -> its weight in its section (``EXAMPLE_COUNTS`` of ``rewardbench/constants.py``;
``math-prm`` is 984, not its 447 rows: see the module docstring)."""

PRIOR_SETS: tuple[str, ...] = ("anthropic_helpful", "anthropic_hhh", "shp", "summarize")
"""The prior preference test sets averaged into "Prior Sets" (``get_average_over_rewardbench``)."""

SECTION_WEIGHT, PRIOR_SETS_WEIGHT = 2.0, 1.0
"""Weights of each section and of Prior Sets in ``score_with_prior_sets`` (the leaderboard's)."""

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
"""Input kinds: JSON Lines, a JSON array (or JSON Lines) and Parquet (through ``datasets``)."""

_SECTION_OF = {s: section for section, subsets in SUBSET_MAPPING.items() for s in subsets}


@dataclass(frozen=True)
class Pair:
    """One RewardBench row.

    Attributes:
        location: ``FILE:LINE`` (``FILE[row i]`` for Parquet), for messages.
        prompt: the user turn, or a message list (the prior sets' multi-turn prompts).
        chosen: the better answer.
        rejected: the worse answer.
        subset: the subset name (:data:`EXAMPLE_COUNTS` keys, :data:`PRIOR_SETS` or another).
        id: the row's ``id``, if it has one.
    """

    location: str
    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str
    subset: str
    id: Any = None


def _read_pair(location: str, record: Mapping[str, Any]) -> Pair:
    """One validated row; :class:`RowError` naming the offending key."""
    subset = check_text(require(record, "subset"), "subset")
    prompt = read_prompt(record)
    chosen = check_text(require(record, "chosen"), "chosen", allow_empty=True)
    rejected = check_text(require(record, "rejected"), "rejected", allow_empty=True)
    return Pair(location, prompt, chosen, rejected, subset, record.get("id"))


def read_pairs(path: str | Path) -> list[Pair]:
    """Every row of a RewardBench-format file (see :data:`INPUT_SUFFIXES`), in file order.

    Rows are ``{"prompt", "chosen", "rejected", "subset"}`` with an optional ``"id"``; the prompt
    is a string or a message list, the answers strings.

    Raises:
        ScoreError: a missing, empty or unsupported file, or ``location: message`` of the first
            bad row (not an object, a missing key, a value of the wrong type).
    """
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"{path}: input not found")
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise ScoreError(
            f"{path}: unknown input format {path.suffix!r}; expected {', '.join(INPUT_SUFFIXES)}"
        )
    pairs = []
    try:
        for row in iter_rows(path):
            try:
                pairs.append(_read_pair(row.location, decode_record(row)))
            except RowError as e:
                raise ScoreError(f"{row.location}: {e.message}") from None
    except DatasetError as e:
        raise ScoreError(str(e)) from None
    except ScoreError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many types on a bad file
        if path.suffix.lower() != ".parquet":
            raise
        raise ScoreError(f"{path}: cannot read it as Parquet ({e})") from None
    if not pairs:
        raise ScoreError(f"{path}: no rows (expected prompt, chosen, rejected, subset per row)")
    return pairs


def pair_form(encoder: RowEncoder) -> str:
    """``"chat"`` when ``encoder`` has a chat template, ``"plain"`` when it was built with
    ``chat_template="none"`` (see the module docstring).

    Raises:
        ScoreError: no template given and the tokenizer has none.
        DatasetError: the template file cannot be read.
    """
    renderer = encoder.ctx.renderer
    if renderer.template is not None:
        return "chat"
    if renderer.source == "none":
        return "plain"
    raise ScoreError(
        f"tokenizer {encoder.ctx.tokenizer.hf.name_or_path!r} has no chat template; pass "
        "--chat-template FILE.jinja to score prompt and answer as a user and an assistant turn, "
        "or --chat-template none to score the plain text prompt + answer"
    )


def pair_records(pair: Pair, form: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The :class:`~megatron.scoring.RowEncoder` rows of ``prompt + chosen`` and
    ``prompt + rejected`` in ``form`` (``"chat"`` or ``"plain"``).

    Raises:
        ScoreError: a message-list prompt in the plain form.
    """
    if form == "plain":
        if not isinstance(pair.prompt, str):
            raise ScoreError(
                f"{pair.location}: 'prompt' is a message list, which needs a chat template "
                "(not --chat-template none)"
            )
        return (
            {"prompt": pair.prompt, "completion": pair.chosen},
            {"prompt": pair.prompt, "completion": pair.rejected},
        )
    turns = pair.prompt
    if isinstance(turns, str):
        turns = [{"role": "user", "content": turns}]
    return (
        {"messages": [*turns, {"role": "assistant", "content": pair.chosen}]},
        {"messages": [*turns, {"role": "assistant", "content": pair.rejected}]},
    )


def score_pairs(
    model: NativeRewardModel | HFRewardModel,
    encoder: RowEncoder,
    pairs: Sequence[Pair],
    batch_size: int = 8,
) -> tuple[list[float], list[float]]:
    """``(chosen scores, rejected scores)``, one each per pair, in order.

    All ``2 * len(pairs)`` sequences go through :func:`~megatron.scoring.score_records` together
    (batched by length).

    Raises:
        ScoreError: ``location: chosen|rejected: message`` of the first sequence that cannot be
            tokenized (too long, a template error), or no usable chat template.
    """
    form = pair_form(encoder)
    records = []
    for pair in pairs:
        chosen, rejected = pair_records(pair, form)
        records += [(f"{pair.location}: chosen", chosen), (f"{pair.location}: rejected", rejected)]
    scores = score_records(model, encoder, records, batch_size)
    return scores[0::2], scores[1::2]


@dataclass(frozen=True)
class SubsetResult:
    """One subset's tally.

    Attributes:
        n: pairs.
        correct: pairs with ``score(chosen) > score(rejected)``.
        ties: pairs with equal scores (counted wrong, as RewardBench does).
    """

    n: int
    correct: int
    ties: int

    @property
    def accuracy(self) -> float:
        """``correct / n``."""
        return self.correct / self.n


def tally(
    pairs: Sequence[Pair], chosen: Sequence[float], rejected: Sequence[float]
) -> dict[str, SubsetResult]:
    """Per-subset results, subsets in first-appearance order. A pair is correct when its chosen
    score is strictly greater (a tie, or a NaN, is wrong)."""
    counts: dict[str, list[int]] = {}
    for pair, c, r in zip(pairs, chosen, rejected, strict=True):
        n_correct_ties = counts.setdefault(pair.subset, [0, 0, 0])
        n_correct_ties[0] += 1
        n_correct_ties[1] += int(c > r)
        n_correct_ties[2] += int(c == r)
    return {s: SubsetResult(*v) for s, v in counts.items()}


def section_scores(accuracies: Mapping[str, float]) -> dict[str, float | None]:
    """Each section's :data:`EXAMPLE_COUNTS`-weighted mean of its present subsets' accuracies,
    ``None`` for a section with none present (``calculate_scores_per_section`` gives 0)."""
    out: dict[str, float | None] = {}
    for section, subsets in SUBSET_MAPPING.items():
        present = [s for s in subsets if s in accuracies]
        weight = sum(EXAMPLE_COUNTS[s] for s in present)
        out[section] = (
            sum(accuracies[s] * EXAMPLE_COUNTS[s] for s in present) / weight if present else None
        )
    return out


def prior_sets_score(accuracies: Mapping[str, float]) -> float | None:
    """The unweighted mean of the :data:`PRIOR_SETS` accuracies present; ``None`` if none is."""
    present = [accuracies[s] for s in PRIOR_SETS if s in accuracies]
    return sum(present) / len(present) if present else None


def summarize(results: Mapping[str, SubsetResult]) -> dict[str, Any]:
    """The RewardBench report of per-subset results (plain data, JSON-ready; accuracies and
    scores are fractions in [0, 1]).

    Returns:
        ``subsets`` (name -> n, correct, ties, accuracy, section: a section name, ``"Prior
        Sets"`` or None), ``sections`` (name -> score or None, subsets present, subsets
        missing), ``prior_sets`` (score, subsets present; None without any), ``other_subsets``,
        ``score`` (mean of the present sections; None without any), ``sections_present``,
        ``partial`` (any of the 23 subsets missing), ``score_with_prior_sets`` (None without
        prior sets).
    """
    acc = {s: r.accuracy for s, r in results.items()}
    order = [s for subs in SUBSET_MAPPING.values() for s in subs] + list(PRIOR_SETS)
    ordered = [s for s in order if s in results] + [s for s in results if s not in order]

    def group(s: str) -> str | None:
        return _SECTION_OF.get(s) or ("Prior Sets" if s in PRIOR_SETS else None)

    subsets = {
        s: {"n": results[s].n, "correct": results[s].correct, "ties": results[s].ties,
            "accuracy": acc[s], "section": group(s)}
        for s in ordered
    }  # fmt: skip
    scores = section_scores(acc)
    sections = {
        name: {"score": scores[name], "subsets": [s for s in subs if s in acc],
               "missing_subsets": [s for s in subs if s not in acc]}
        for name, subs in SUBSET_MAPPING.items()
    }  # fmt: skip
    present = [v for v in scores.values() if v is not None]
    score = sum(present) / len(present) if present else None
    prior = prior_sets_score(acc)
    with_prior = None
    if prior is not None:
        with_prior = (SECTION_WEIGHT * sum(present) + PRIOR_SETS_WEIGHT * prior) / (
            SECTION_WEIGHT * len(present) + PRIOR_SETS_WEIGHT
        )
    return {
        "subsets": subsets,
        "sections": sections,
        "prior_sets": None
        if prior is None
        else {"score": prior, "subsets": [s for s in PRIOR_SETS if s in acc]},
        "other_subsets": [s for s in ordered if group(s) is None],
        "score": score,
        "sections_present": len(present),
        "partial": any(s not in acc for s in _SECTION_OF),
        "score_with_prior_sets": with_prior,
    }


_WITH_PRIOR = "score w/ Prior Sets"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(report: Mapping[str, Any]) -> str:
    """The report of :func:`summarize` as a text table (accuracies and scores in percent)."""
    subsets = report["subsets"]
    width = max([len(_WITH_PRIOR), *map(len, subsets)]) + 2
    lines = [f"{'subset':<{width}}{'n':>6}{'accuracy %':>12}{'ties':>6}"]
    lines += [
        f"{s:<{width}}{r['n']:>6}{_pct(r['accuracy']):>12}{r['ties']:>6}"
        for s, r in subsets.items()
    ]
    if report["other_subsets"]:
        lines.append(f"other (in no section): {', '.join(report['other_subsets'])}")
    lines += ["", f"{'section':<{width}}{'score %':>12}  subsets"]
    for name, sec in report["sections"].items():
        total = len(sec["subsets"]) + len(sec["missing_subsets"])
        note = "" if sec["score"] is not None else "  absent"
        lines.append(
            f"{name:<{width}}{_pct(sec['score']):>12}  {len(sec['subsets'])}/{total}{note}"
        )
    prior = report["prior_sets"]
    if prior is not None:
        lines.append(
            f"{'Prior Sets':<{width}}{_pct(prior['score']):>12}  {len(prior['subsets'])}/"
            f"{len(PRIOR_SETS)}"
        )
    n_sub = sum(len(sec["subsets"]) for sec in report["sections"].values())
    note = (
        f"  PARTIAL: {report['sections_present']} of {len(SUBSET_MAPPING)} sections, "
        f"{n_sub} of {len(EXAMPLE_COUNTS)} subsets"
        if report["partial"]
        else ""
    )
    lines.append(f"{'score':<{width}}{_pct(report['score']):>12}{note}")
    if report["score_with_prior_sets"] is not None:
        lines.append(
            f"{_WITH_PRIOR:<{width}}{_pct(report['score_with_prior_sets']):>12}"
            "  (sections x2, Prior Sets x1)"
        )
    return "\n".join(lines)
