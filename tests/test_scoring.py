"""``megatron.scoring`` without a checkpoint: how rows are tokenized and scored in batches.

The reward-model classes themselves (native checkpoint vs Hugging Face export, ``tools/score.py``)
are tested with the checkpoint tools in ``tests/ckpt/test_reward_export.py``.
"""

from __future__ import annotations

import pytest

from megatron.data.formats import FORMATS, EncodeContext
from megatron.data.preprocess import PreprocessOptions
from megatron.data.sources import RowError
from megatron.scoring import RowEncoder, ScoreError, open_reward_model, score_records
from megatron.tokenizer import load_tokenizer
from tests.data.conftest import CHATML

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is the cat?"},
    {"role": "assistant", "content": "On the mat."},
]


@pytest.fixture(scope="module")
def setup(tiny_tokenizer_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("scoring") / "chatml.jinja"
    template.write_text(CHATML)
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    return tokenizer, str(template)


def _pairwise(tokenizer, template, pair) -> list[int]:
    """prompt + chosen of ``pair`` as ``tools/preprocess_data.py --format pairwise`` stores it."""
    ctx = EncodeContext(
        tokenizer, PreprocessOptions(data_format="pairwise", chat_template=template)
    )
    fmt = FORMATS["pairwise"]
    (enc,) = fmt.encode(fmt.extract(pair, ctx.options), ctx)
    return [*enc.arrays["prompt"].tolist(), *enc.arrays["chosen"].tolist()]


def test_rows_are_tokenized_as_pairwise_training_data(setup):
    tokenizer, template = setup
    encoder = RowEncoder(tokenizer, template)
    other = {"role": "assistant", "content": "Elsewhere."}
    want = _pairwise(
        tokenizer, template, {"chosen": CONVERSATION, "rejected": [*CONVERSATION[:-1], other]}
    )
    assert encoder.encode({"messages": CONVERSATION}) == want
    row = {"prompt": "The quick brown fox", "completion": " jumps."}
    want = _pairwise(tokenizer, template, {**row, "chosen": row["completion"], "rejected": " no."})
    assert encoder.encode(row) == want
    assert want[-1] == tokenizer.eos_id  # EOS appended to a string completion, as in training
    # a conversation that does not end with an answer is scored whole
    question = {"messages": CONVERSATION[:2]}
    assert encoder.encode(question) == tokenizer.encode(
        "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION[:2])
    )


def test_max_length_fails_or_cuts_the_prompt_from_the_left(setup):
    tokenizer, template = setup
    row = {"messages": CONVERSATION}
    full = RowEncoder(tokenizer, template).encode(row)
    with pytest.raises(RowError, match=r"> --max-length 12"):
        RowEncoder(tokenizer, template, max_length=12).encode(row)
    cut = RowEncoder(tokenizer, template, max_length=len(full) - 3, truncate=True).encode(row)
    assert cut == full[3:]


class _FakeModel:
    """Scores a row by its length and last token; records the batches it was given."""

    vocab_size = 512

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def score(self, rows, pad_id):
        self.batches.append([len(r) for r in rows])
        return [len(r) + r[-1] / 1000 for r in rows]


def test_score_records_keeps_row_order_and_batches_by_length(setup):
    tokenizer, template = setup
    encoder = RowEncoder(tokenizer, template)
    texts = ["a", "a much longer completion than the others", "mid length one", "b"]
    records = [
        (f"rows.jsonl:{i + 1}", {"prompt": "Q", "completion": t}) for i, t in enumerate(texts)
    ]
    model = _FakeModel()
    scores = score_records(model, encoder, records, batch_size=2)
    lengths = [len(encoder.encode(r)) for _, r in records]
    assert [int(s) for s in scores] == lengths  # in the input order
    assert model.batches == [sorted(lengths)[:2], sorted(lengths)[2:]]  # similar lengths together


def test_bad_rows_name_their_location(setup, tmp_path):
    tokenizer, template = setup
    encoder = RowEncoder(tokenizer, template)
    model = _FakeModel()
    with pytest.raises(ScoreError, match=r"^rows\.jsonl:2: missing key 'messages'"):
        score_records(model, encoder, [("rows.jsonl:1", {"messages": CONVERSATION}),
                                       ("rows.jsonl:2", {"text": "x"})])  # fmt: skip
    with pytest.raises(ScoreError, match="conversational rows need a chat template"):
        score_records(model, RowEncoder(tokenizer, "none"), [("r:1", {"messages": CONVERSATION})])
    model.vocab_size = 100
    with pytest.raises(ScoreError, match=r"r:1: token id \d+ >= the model's vocab_size 100"):
        score_records(model, encoder, [("r:1", {"messages": CONVERSATION})])
    with pytest.raises(ScoreError, match="neither a Hugging Face model directory"):
        open_reward_model(tmp_path)
