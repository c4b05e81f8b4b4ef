"""SamplingParams validation and the on-device sampler."""

from __future__ import annotations

import pytest
import torch

from flashdecode.engine import SamplingParams
from flashdecode.engine.sampling import SamplingBatch, sample


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 0}, {"max_tokens": -3}, {"max_tokens": 2.5}, {"max_tokens": True},
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": "1"},
    {"top_k": -1}, {"top_k": 1.5},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": -0.2},
    {"seed": 1.0}, {"seed": "7"},
    {"stop": 3}, {"stop": [""]}, {"stop": ["ok", 4]},
    {"ignore_eos": 1},
])
def test_invalid_params_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed, p.ignore_eos) == (16, 1.0, 0, 1.0, None, False)
    assert p.stop == () and not p.greedy
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop_strings == ("a", "b")
    assert SamplingParams(temperature=0).greedy


def _batch(params, generators=None):
    return SamplingBatch.build(params, generators or [None] * len(params), torch.device("cpu"))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


LOGITS = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 0.5],
                       [2.0, 0.0, 0.1, 0.2, 1.9, -3.0]])


def test_greedy_and_degenerate_filters_are_argmax():
    assert sample(LOGITS, _batch([SamplingParams(temperature=0)] * 2)).tolist() == [1, 0]
    for p in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(temperature=1e-4)):
        for seed in range(5):
            assert sample(LOGITS, _batch([p] * 2), _gen(seed)).tolist() == [1, 0]


def test_top_k_and_top_p_restrict_the_support():
    logits = LOGITS.repeat(200, 1)
    k2 = sample(logits, _batch([SamplingParams(top_k=2, temperature=5.0)] * 400), _gen(0)).view(200, 2)
    assert set(k2[:, 0].tolist()) == {1, 3} and set(k2[:, 1].tolist()) == {0, 4}
    # row 0 probabilities: 1 -> ~0.50, 3 -> ~0.30, 2 -> ~0.07 ... top_p=0.7 keeps tokens {1, 3}
    p7 = sample(logits, _batch([SamplingParams(top_p=0.7)] * 400), _gen(1)).view(200, 2)
    assert set(p7[:, 0].tolist()) == {1, 3}


def test_mixed_batch_rows_follow_their_own_settings():
    params = [SamplingParams(temperature=0), SamplingParams(top_k=2, temperature=3.0)]
    for seed in range(10):
        out = sample(LOGITS, _batch(params), _gen(seed)).tolist()
        assert out[0] == 1 and out[1] in (0, 4)


def test_sampling_matches_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).repeat(20000, 1)
    draws = sample(logits, _batch([SamplingParams()] * 20000), _gen(3))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015, rtol=0)


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(3, 50, generator=_gen(0))
    p = SamplingParams(temperature=1.0, seed=11)
    alone = [sample(logits[1:2], _batch([p], [_gen(11)])).item() for _ in range(1)]
    g = _gen(11)
    together = sample(logits, _batch([SamplingParams()] * 3, [None, g, None]), _gen(5))
    assert together[1].item() == alone[0]
    # and a seeded stream continues identically step after step
    g1, g2 = _gen(42), _gen(42)
    seq1 = [sample(logits[:1], _batch([p], [g1])).item() for _ in range(20)]
    seq2 = [sample(logits[:1], _batch([p], [g2])).item() for _ in range(20)]
    assert seq1 == seq2 and len(set(seq1)) > 1
