"""Key/value caches written in place: each layer's keys (and values) are one flat Parameter of
(rows x KV heads x slots, head size), the rows being conversations (or a batch's sequences).

Why this shape: MindSpore's compiled graphs update in place only Parameters (held by a Cell, or
given as inputs: a plain Tensor input, even over a Parameter's storage, is copied whole first),
and on the CPU backend only `scatter_update` (whole rows of the first axis) does so without copying
the buffer; ScatterNdUpdate and a functional `where` rewrite all of it (~5 GB/s: 45 ms per token
at 8192 slots on the 0.5B shape). Reads go through a reshape (no copy). Two kinds of step:

- a decode step (one token per row) attends to the past slots where they lie and to the new key
  apart (`attention(..., past=...)`), then writes the new slot: written before its reads, the
  buffer was copied whole (measured), which is the cost this layout exists to avoid;
- a piece of a prompt (many tokens) writes its keys first and attends over the buffer: one
  buffer copy is small beside the piece's own work, and attending to the past apart would keep
  a second set of (tokens x slots) scores per layer alive in the compiled graph (the CPU backend
  keeps a graph's intermediates: a 4096-token prompt on the 0.5B shape reached 24 GB that way).

On the CPU target, float32, the native cached attention (nn/decoder_kernels.py) takes the same
write plan and writes the new keys and values itself, after its reads: no scatter in the graph.
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
    """The boolean mask of a cached step (host side). `valid` (B, S): slots holding real tokens,
    the new ones (slots starts[i]..) included. A piece (T > 1) attends over the buffer after its
    write: (B, 1, T, S), query i sees the valid slots up to its own. A decode step (T = 1) attends
    to the past slots and its new key apart: (B, 1, 1, S + 1)."""
    b, slots = valid.shape
    starts = np.asarray(starts).reshape(b, 1)
    seen = valid != 0
    if t > 1:
        causal = np.arange(slots)[None, None] <= starts[:, :, None] + np.arange(t)[None, :, None]
        return (causal & seen[:, None])[:, None]
    past = seen & (np.arange(slots)[None] < starts)
    new = np.take_along_axis(seen, np.minimum(starts, slots - 1), 1)
    return np.concatenate([past, new], 1)[:, None, None]


def read_past(buffer, step):
    """A layer's cached keys (or values) for the step's rows, as (n, KV, span, D): every row in
    order (no copy) or the rows gathered; every slot (a decode step: no copy) or the first `span`
    (a prompt's piece attends only to the slots up to its end, rounded up to a power of two)."""
    rows, view, span, _, _ = step
    past = buffer.reshape(view)
    if span < view[2]:
        past = past[:, :, :span]
    return past if rows is None else ops.gather(past, rows, 0)


def write_new(buffer, new, step):
    """Write the step's new keys (or values) (n, KV, T, D) into their slots, in place. `pick`
    chooses which new vector goes to each flat slot of `slots`: tokens past a row's last slot
    repeat the row's last written one at the same slot (an identical value, so the repeated index
    is harmless)."""
    _, _, _, pick, slots = step
    return ops.scatter_update(buffer, slots, ops.gather(new.reshape(-1, new.shape[-1]), pick, 0))


def write_step(buffer, new, step):
    """`write_new` for a decode step whose new vectors come flat, (rows x KV heads, D) in the
    step's order: one token per row, so `pick` is the identity and no gather is needed."""
    return ops.scatter_update(buffer, step[4], new)
