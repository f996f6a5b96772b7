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
