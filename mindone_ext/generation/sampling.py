"""Next-token choice on the host, with the reference's logits processors in its order:
repetition penalty, then temperature, top-k and top-p, then a draw (or argmax when greedy).

Logits for one step are a (B, V) float32 row that is tiny next to the weights read per step,
and the loop needs the chosen ids on the host anyway to test for stop tokens, so doing this
in numpy costs nothing measurable and is identical on every device.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = 50
    top_p: Optional[float] = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    @classmethod
    def from_settings(cls, settings, seed=None):
        """From a dict with do_sample, temperature, top_k, top_p, repetition_penalty (other keys ignored)."""
        return cls(settings["do_sample"], settings["temperature"], settings["top_k"], settings["top_p"],
                   settings["repetition_penalty"], seed)

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits, seen_ids, penalty):
    """Every id in `seen_ids` (B, L), prompt included: divide positive, multiply negative."""
    if penalty == 1.0:
        return logits
    rows = np.arange(logits.shape[0])[:, None]
    picked = logits[rows, seen_ids]
    logits = logits.copy()
    logits[rows, seen_ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def apply_top_k(logits, k):
    if not k or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def apply_top_p(logits, p):
    """The reference's top-p: per row, the fewest most likely tokens whose probability reaches p
    (ties kept in index order). Only a row's finite logits are sorted (after top-k, 40 of the
    Talker's 8448 or the Thinker's 152064: a full sort took most of a sampled step's host time)."""
    if p is None or p >= 1.0:
        return logits
    out = np.full_like(logits, -np.inf)
    for row, kept_row in zip(logits, out):
        candidates = finite(row)
        order = candidates[np.argsort(row[candidates], kind="stable")]  # ascending, as the reference
        remove = np.cumsum(softmax(row[order])) <= (1 - p)
        remove[-1:] = False  # always keep the most likely token
        kept = order[~remove]
        kept_row[kept] = row[kept]
    return out


def finite(row):
    """The indices of a row's finite logits (the others can never be drawn), in index order."""
    return np.flatnonzero(row > -np.inf)


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits, seen_ids):
        c = self.config
        logits = apply_repetition_penalty(np.asarray(logits, np.float32), seen_ids, c.repetition_penalty)
        if not c.do_sample:
            return logits.argmax(-1)
        logits = apply_top_p(apply_top_k(logits / np.float32(c.temperature), c.top_k), c.top_p)
        return np.array([self._draw(row, u) for row, u in zip(logits, self.rng.random(len(logits)))])

    @staticmethod
    def _draw(row, u):
        """The token at `u` (uniform in [0, 1)) of the row's cumulative distribution."""
        candidates = finite(row)
        probs = softmax(row[candidates].astype(np.float64))
        return candidates[min((np.cumsum(probs) < u).sum(), len(candidates) - 1)]
