"""Our numpy logits processors against transformers' own, on the same logits."""
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from mindone_ext.generation.sampling import (Sampler, SamplingConfig, apply_repetition_penalty, apply_top_k,
                                             apply_top_p)

rng = np.random.default_rng(0)
LOGITS = rng.standard_normal((3, 50)).astype(np.float32) * 3
SEEN = rng.integers(0, 50, size=(3, 7))


def test_repetition_penalty():
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(SEEN), torch.tensor(LOGITS)).numpy()
    np.testing.assert_array_equal(apply_repetition_penalty(LOGITS, SEEN, 1.3), want)


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
def test_top_k(k):
    want = TopKLogitsWarper(k)(None, torch.tensor(LOGITS)).numpy()
    np.testing.assert_array_equal(apply_top_k(LOGITS, k), want)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_p(p):
    scaled = TemperatureLogitsWarper(0.7)(None, torch.tensor(LOGITS)).numpy()
    want = TopPLogitsWarper(p)(None, torch.tensor(scaled)).numpy()
    np.testing.assert_array_equal(apply_top_p(scaled, p), want)


@pytest.mark.parametrize("k,p", [(40, 0.8), (1, 0.8), (0, 0.9), (8448, 0.5), (300, 0.05)])
def test_top_k_then_top_p_at_the_talkers_vocabulary(k, p):
    """The chain the Talker samples with, on its 8448 logits with suppressed entries: top-p sorts
    only what top-k left, and keeps exactly what the reference keeps. (No ties: the reference's
    sort is not stable, so which of tied tokens its top-p cut keeps is its sort's choice.)"""
    logits = np.random.default_rng(k).standard_normal((3, 8448)).astype(np.float32) * 3
    logits[:, 8292:] = -np.inf  # as the Talker's suppressed tokens
    scaled = TemperatureLogitsWarper(0.9)(None, torch.tensor(logits))
    want = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, scaled) if k else scaled).numpy()
    np.testing.assert_array_equal(apply_top_p(apply_top_k(scaled.numpy(), k), p), want)


def test_draws_are_the_inverse_of_the_whole_rows_distribution():
    """A draw is the first token whose cumulative probability over the whole (filtered) row
    passes the uniform number: the same token whether or not the tokens top-k and top-p removed
    are looked at."""
    config = SamplingConfig(do_sample=True, temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05, seed=7)
    rng = np.random.default_rng(1)
    sampler, uniform = Sampler(config), np.random.default_rng(7)
    for _ in range(200):
        logits = rng.standard_normal((2, 8448)).astype(np.float32) * 2
        seen = rng.integers(0, 8448, (2, 30))
        filtered = apply_top_p(apply_top_k(apply_repetition_penalty(logits, seen, 1.05) / np.float32(0.9), 40), 0.8)
        probs = np.exp(filtered.astype(np.float64) - filtered.max(-1, keepdims=True))
        cumulative = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
        want = (cumulative < uniform.random((2, 1))).sum(-1)
        np.testing.assert_array_equal(sampler(logits, seen), want)


def test_draws_follow_the_distribution():
    logits = np.log(np.array([[0.7, 0.2, 0.1, 1e-9]], np.float32))
    sampler = Sampler(SamplingConfig(do_sample=True, top_k=0, seed=0))
    draws = np.array([sampler(logits, np.zeros((1, 0), np.int64))[0] for _ in range(4000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1, 0.0], atol=0.03)


@pytest.mark.parametrize("bad", [dict(do_sample=True, temperature=0), dict(top_p=0.0), dict(top_k=-1),
                                 dict(repetition_penalty=0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)
