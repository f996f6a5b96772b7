"""Key/value caches written in place: each layer's keys (and values) are one flat Parameter of
(rows x KV heads x slots, head size), the rows being conversations (or a batch's sequences).

Why this shape: MindSpore's compiled graphs update in place only Parameters held by a Cell, and
on the CPU backend only `scatter_update` (whole rows of the first axis) does so without copying
the buffer; ScatterNdUpdate and a functional `where` rewrite all of it (~5 GB/s: 45 ms per token
at 8192 slots on the 0.5B shape). A step reads the past slots through a reshape (no copy),
attends to the new keys separately (`attention(..., past=...)`) and only then writes the new
slots: a write before the reads, or after every layer's reads, made the backend copy the buffer
(measured), so each layer writes right after its own attention.
"""
import numpy as np
import mindspore as ms
from mindspore import ops

from .ops import arange


def causal_mask(valid, t):
    """(B, 1, T, T) boolean mask of a forward without a cache: query i sees valid keys up to i."""
    causal = arange(t).reshape(1, 1, t) <= arange(t).reshape(1, t, 1)
    return ops.logical_and(causal.reshape(1, 1, t, t), valid.astype(ms.bool_).reshape(-1, 1, 1, t))


def step_mask(valid, starts, t):
    """The mask of a cached step (host side): (B, 1, T, S + T) over the past slots, then the T new
    tokens. `valid` (B, S): slots holding real tokens, the new ones (slots starts[i]..) included;
    a query sees the valid slots before its row's start, and the valid new tokens up to itself.
    New tokens past the last slot (padding of a fixed-width piece) are not valid."""
    b, slots = valid.shape
    starts = np.asarray(starts).reshape(b, 1)
    past = (valid != 0) & (np.arange(slots)[None] < starts)
    new_slots = starts + np.arange(t)[None]
    new = np.take_along_axis(valid, np.minimum(new_slots, slots - 1), 1) != 0
    new &= new_slots < slots
    causal = np.tril(np.ones((t, t), bool))
    mask = np.concatenate([np.broadcast_to(past[:, None, :], (b, t, slots)), causal[None] & new[:, None, :]], -1)
    return np.ascontiguousarray(mask[:, None])


def read_past(buffer, step):
    """A layer's past keys (or values) (n, KV, S, D) for the step's rows: the buffer as it is
    (every row, in order: no copy) or the rows gathered."""
    rows, view, _, _ = step
    past = buffer.reshape(view)
    return past if rows is None else ops.gather(past, rows, 0)


def write_new(buffer, new, step):
    """Write the step's new keys (or values) (n, KV, T, D) into their slots, in place. `pick`
    chooses which new vector goes to each flat slot of `slots`: tokens past a row's last slot
    repeat the row's last written one at the same slot (an identical value, so the repeated index
    is harmless)."""
    _, _, pick, slots = step
    return ops.scatter_update(buffer, slots, ops.gather(new.reshape(-1, new.shape[-1]), pick, 0))
