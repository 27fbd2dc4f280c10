"""The log-probs the built-in decoder reports for sampled tokens are the training forward's.

Online RL computes the old policy's log-probs (``sampling/logp_difference``) from the sampler or
from a training forward of the same sequences; for the built-in backend the two must agree. Here
the completions sampled (temperature 1, top-p truncation, which does not change the reported
log-probs) are packed into one training row — each ``prompt + completion`` a segment, as a
rollout micro-batch lays them out — and the model's ``token_logps`` at the completion positions
are compared with ``GenerationOutput.logprobs``.

Tolerance: both sides are fp32 computations from the same weights; the cached decode and the
packed forward run attention over different key layouts, and the training path takes the
log-softmax by vocab-parallel chunks while generation takes it over gathered logits, so each
log-prob may differ by float round-off of O(1e-6) (the decoder's docstring measures 1.5e-6 in
fp32 for cached vs uncached forwards); 1e-5 keeps a margin. A misaligned position (a log-prob
read one token off) moves values by O(1).
"""

from __future__ import annotations

import torch

from megatron.model import GPTModel
from megatron.model.generate import SamplingConfig, generate
from megatron.model.layout import SequenceLayout
from megatron.parallel import ParallelState
from tests.helpers_runs import tiny_model_config


def test_sampled_logprobs_equal_the_packed_training_forward():
    cfg = tiny_model_config()
    model = GPTModel(cfg, ParallelState.single(), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 2, 8)]
    sampling = SamplingConfig(max_new_tokens=7, temperature=1.0, top_p=0.9)
    out = generate(model, prompts, sampling, seed=11)
    completions = out.to_lists()
    tokens, targets, segments, positions, where = [], [], [], [], []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq = p + c
        start = len(tokens)
        tokens += seq
        targets += seq[1:] + [0]
        segments += [i + 1] * len(seq)
        positions += list(range(len(seq)))
        # the target c[j] is predicted at position len(p) - 1 + j of the segment
        where.append([start + len(p) - 1 + j for j in range(len(c))])
    row = lambda x: torch.tensor([x])  # noqa: E731  [1, s]
    layout = SequenceLayout(row(positions), row(segments))
    with torch.no_grad():
        train = model(row(tokens), layout, row(targets))["token_logps"][0]
    for i, idx in enumerate(where):
        n = len(idx)
        assert n == int(out.lengths[i]) and n > 1
        torch.testing.assert_close(train[idx], out.logprobs[i, :n], atol=1e-5, rtol=0)
        print(
            f"row {i}: max |dlogp| {float((train[idx] - out.logprobs[i, :n]).abs().max()):.1e}"
        )  # -s
    assert len({t for c in completions for t in c}) > 3  # sampled, not one repeated token
