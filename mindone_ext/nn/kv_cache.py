"""A static key/value cache: fixed-shape buffers written at explicit positions.

The buffers never change shape, so a decode step that takes and returns them compiles once.
`valid` records which slots hold real tokens (prompt padding and unwritten slots are 0).
"""
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import ops

from .ops import arange


def write_kv(cache, new, start):
    """Return `cache` (B, KV, S, D) with `new` (B, KV, T, D) written at slots start..start+T-1.

    `start` is a tensor, so one compiled graph serves every position: a scalar, or one start per
    row (B,) when T is 1 (rows of a pool decoding together, each at its own length). A start at
    or past S writes nothing."""
    slots, t = cache.shape[2], new.shape[2]
    offset = arange(slots).reshape(1, slots) - start.reshape(-1, 1)
    inside = ops.logical_and(offset >= 0, offset < t).reshape(-1, 1, slots, 1)
    if t > 1:
        new = ops.gather(new, ops.clip(offset[0], 0, t - 1), 2)
    return ops.where(inside, new, cache)


@dataclass
class StaticCache:
    layers: tuple  # per layer: (keys, values), each (B, KV, S, D)
    valid: np.ndarray  # (B, S) int32, 1 where a slot holds a real token
    length: int = 0  # slots written so far (shared by all rows: prompts are left padded)

    @classmethod
    def allocate(cls, num_layers, batch, kv_heads, slots, head_dim, dtype):
        zeros = lambda: ops.zeros((batch, kv_heads, slots, head_dim), dtype)  # noqa: E731
        return cls(tuple((zeros(), zeros()) for _ in range(num_layers)), np.zeros((batch, slots), np.int32))

    @property
    def slots(self):
        return self.valid.shape[1]

    def grow(self, slots):
        """More slots, the written ones kept (the decode graphs recompile for the new size)."""
        extra = slots - self.slots
        pad = lambda x: ops.cat((x, ops.zeros(x.shape[:2] + (extra,) + x.shape[3:], x.dtype)), 2)  # noqa: E731
        self.layers = tuple((pad(k), pad(v)) for k, v in self.layers)
        self.valid = np.concatenate([self.valid, np.zeros((self.valid.shape[0], extra), np.int32)], 1)

    def truncate(self, length):
        """Forget the slots from `length` on (they are overwritten by the next writes)."""
        self.valid[:, length:] = 0
        self.length = length

    def release(self):
        self.layers = ()


def causal_mask(valid, start, t):
    """(B, 1, T, S) boolean mask: query i (at slot start+i) sees valid slots up to its own.
    `start`: a scalar, or one per row (B,)."""
    slots = valid.shape[1]
    query_slots = arange(t).reshape(1, t, 1) + start.reshape(-1, 1, 1)
    causal = arange(slots).reshape(1, 1, slots) <= query_slots
    return ops.logical_and(causal.reshape(-1, 1, t, slots), valid.astype(ms.bool_).reshape(-1, 1, 1, slots))
