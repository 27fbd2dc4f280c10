"""build_loaded: a model made from a state dict on the meta device holds that state dict's
tensors (no second copy of the weights, no random initialisation) and computes what a
conventionally built and loaded model computes — exactly, since the weights are the same
tensors and the forward is the same code."""

from __future__ import annotations

import pytest
import torch

from megatron.model import GPTModel
from megatron.model.gpt import build_loaded
from megatron.parallel import ParallelState
from tests.helpers_runs import tiny_model_config


def test_build_loaded_holds_the_state_dict_and_computes_the_same():
    cfg, state = tiny_model_config(), ParallelState.single()
    source = GPTModel(cfg, state, seed=5)
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    model = build_loaded(cfg, state, weights, seed=123)  # the seed is not used: nothing is drawn
    built = dict(source.named_parameters())
    for name, p in model.named_parameters():
        assert p.data_ptr() == weights[name].data_ptr(), f"{name} was copied"
        assert vars(p) == vars(built[name]), f"{name} lost its attributes (e.g. TP markers)"
    assert any(vars(p) for p in model.parameters()), "the TP layers mark their parameters"
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), source.eval()(tokens))


def test_build_loaded_refuses_a_state_dict_that_does_not_fit():
    cfg, state = tiny_model_config(), ParallelState.single()
    weights = GPTModel(cfg, state, seed=5).state_dict()
    weights.pop(next(iter(weights)))
    with pytest.raises(RuntimeError, match="Missing key"):
        build_loaded(cfg, state, weights)
