"""Sampling distributions (temperature, top-k, top-p) against hand-computed probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from rwkvslice.errors import ConfigError
from rwkvslice.generate import check_sampling_args, sample_next, sampling_probs

P = [0.5, 0.3, 0.15, 0.05]


def logits_of(p):
    return torch.tensor([[math.log(x) for x in p]], dtype=torch.float32)


def assert_probs(got, expected):
    # fp32 softmax of log-probabilities: a few ulps
    torch.testing.assert_close(got[0].double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=2e-7)


def test_plain_softmax():
    assert_probs(sampling_probs(logits_of(P)), P)


@pytest.mark.parametrize("top_p, expected", [
    (0.45, [1.0, 0.0, 0.0, 0.0]),               # the top token alone reaches 0.45
    (0.6, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),    # 0.5 < 0.6 <= 0.8: two tokens
    (0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
    (1.0, P),
])
def test_top_p(top_p, expected):
    assert_probs(sampling_probs(logits_of(P), top_p=top_p), expected)


def test_top_p_keeps_tokens_tied_at_the_cutoff():
    probs = sampling_probs(torch.tensor([[1.0, 1.0, 0.0]]), top_p=0.3)
    assert_probs(probs, [0.5, 0.5, 0.0])


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(temperature):
    scaled = [x ** (1 / temperature) for x in P]  # softmax(log p / T) = p^(1/T) / sum
    assert_probs(sampling_probs(logits_of(P), temperature=temperature), [x / sum(scaled) for x in scaled])


def test_temperature_is_applied_before_top_p():
    scaled = [math.sqrt(x) for x in P]
    tempered = [x / sum(scaled) for x in scaled]  # [0.379, 0.294, 0.208, 0.120]
    assert tempered[0] < 0.6 <= tempered[0] + tempered[1]
    kept = tempered[0] + tempered[1]
    expected = [tempered[0] / kept, tempered[1] / kept, 0, 0]
    assert_probs(sampling_probs(logits_of(P), temperature=2.0, top_p=0.6), expected)


def test_top_k():
    assert_probs(sampling_probs(logits_of(P), top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])
    assert_probs(sampling_probs(logits_of(P), top_k=10), P)  # k >= V: no-op


def test_rows_are_independent():
    logits = torch.cat([logits_of(P), logits_of([0.05, 0.15, 0.3, 0.5])])
    probs = sampling_probs(logits, top_p=0.6)
    assert_probs(probs[:1], [0.625, 0.375, 0.0, 0.0])
    assert_probs(probs[1:], [0.0, 0.0, 0.375, 0.625])


def test_greedy():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]


def test_empirical_frequencies_match():
    n = 20000
    g = torch.Generator().manual_seed(0)
    tokens = sample_next(logits_of(P).expand(n, -1), temperature=1.0, top_p=0.9, generator=g)
    freq = torch.bincount(tokens, minlength=4).double() / n
    expected = torch.tensor([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], dtype=torch.float64)
    # 5 standard deviations of a binomial frequency at n = 20000 is at most 0.018
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.018)
    assert freq[3] == 0  # the token cut by top-p is never drawn


def test_same_seed_same_tokens():
    logits = torch.randn(8, 50)
    a = sample_next(logits, generator=torch.Generator().manual_seed(5))
    b = sample_next(logits, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1.0, "top_p": 1.0, "top_k": 0}, "--temperature"),
    ({"temperature": float("inf"), "top_p": 1.0, "top_k": 0}, "--temperature"),
    ({"temperature": 1.0, "top_p": 0.0, "top_k": 0}, "--top-p"),
    ({"temperature": 1.0, "top_p": 1.5, "top_k": 0}, "--top-p"),
    ({"temperature": 1.0, "top_p": 1.0, "top_k": -1}, "--top-k"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        check_sampling_args(**kwargs)


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_sampling_probs_has_no_distribution_for_greedy_temperatures(temperature):
    with pytest.raises(ConfigError) as err:
        sampling_probs(logits_of(P), temperature=temperature)
    assert str(err.value) == "sampling_probs needs temperature > 0 (temperature 0 is greedy decoding)"
    # sample_next handles temperature 0 itself: the argmax, without asking for a distribution
    assert sample_next(logits_of(P), temperature=0).tolist() == [0]
