"""The demo's rewards for GRPO (configs/demo/grpo.yml names them ``rewards.py:exact_match`` and
``rewards.py:digit_accuracy``, paths relative to that file).

Both have TRL's reward-function signature: ``answer`` is the prompt row's extra column (kept by
``--format prompt``), one value per completion.
"""


def exact_match(prompts, completions, answer, **kwargs):
    """1.0 where the completion (EOS stripped by decoding) equals the answer, else 0.0."""
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]


def digit_accuracy(prompts, completions, answer, **kwargs):
    """The fraction of the answer's positions the completion gets right (partly right answers
    score above wrong ones; the demo logs it with weight 0, so it does not train)."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        got, want = c.split(), a.split()
        hits = sum(g == w for g, w in zip(got, want, strict=False))
        out.append(hits / max(len(want), len(got), 1))
    return out
