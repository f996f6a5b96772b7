"""Scaled dot-product attention behind one function: Ascend's fused flash kernel or exact math.

Layouts: q (B, H, T, D), k and v (B, KV, S, D) with H a multiple of KV (grouped-query
attention), mask (B, 1, T, S) boolean, True where a query may attend a key.
Returns (B, T, H * D).
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from .device import on_ascend

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def check_attn_implementation(name):
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    return name


def use_flash(attn_implementation, dtype, head_dim):
    """Flash attention runs only on Ascend, only in half precision and only for head sizes the
    kernel takes (multiples of 16 up to 512); elsewhere the exact path gives the same numerics
    whichever implementation was asked for."""
    return (attn_implementation == "flash_attention_2" and on_ascend() and dtype in (ms.float16, ms.bfloat16)
            and head_dim % 16 == 0 and head_dim <= 512)


_scores = ops.BatchMatMul(transpose_b=True)  # q @ k^T without materialising k^T (swapaxes copies it)
_transposed_times = ops.BatchMatMul(transpose_a=True)  # a^T @ b, the same way


def _probabilities(q, k, mask, scale, past=None):
    """softmax(q k^T * scale) over the allowed keys, (B, KV, G*T, S) in q's dtype: the G query
    heads that share a kv head (reference repeat_kv order: head = kv_index * G + r) stacked along
    the query axis, so grouped-query attention needs no repeated k/v."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    g = h // kv
    q = q.reshape(b, kv, g * t, d)
    scores = _scores(q, k)
    if past is not None:  # keys: the cache's past slots, then the new ones
        scores = ops.cat((_scores(q, past[0]), scores), -1)
    s = scores.shape[-1]
    scores = (scores * scale).reshape(b, kv, g, t, s).astype(ms.float32)
    if mask is not None:  # None: every key allowed
        # A finite floor, not -inf: fully masked rows (left padding) stay finite, as in the reference.
        floor = ops.full_like(scores, -3.4028234663852886e38)
        scores = ops.where(mask.expand_dims(2), scores, floor)
    return ops.softmax(scores, -1).astype(q.dtype).reshape(b, kv, g * t, s)


def exact_attention(q, k, v, mask, scale, past=None):
    b, h, t, d = q.shape
    probs = _probabilities(q, k, mask, scale, past)
    if past is None:
        out = ops.matmul(probs, v)
    else:
        slots = past[1].shape[2]
        out = ops.matmul(probs[..., :slots], past[1]) + ops.matmul(probs[..., slots:], v)
    return out.reshape(b, h, t, d).swapaxes(1, 2).reshape(b, t, h * d)


def exact_attention_backward(q, k, v, out, mask, scale, d_out):
    """(dq, dk, dv) of exact_attention without a cache, for the gradient `d_out` of its output `out`
    (both (B, T, H * D)). The probabilities are computed again rather than kept from the forward
    (a tokens x tokens matrix per head and layer), and softmax's backward takes rowsum(dP * P) as
    rowsum(d_out * out), which is equal (out = P v) and costs (T, D) instead of (T, S): flash
    attention's backward. A fully masked query row (left padding) gets no gradient from the mask
    in autodiff; here it gets none because nothing reads its output, so its d_out is zero."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    probs = _probabilities(q, k, mask, scale)

    def stacked(x):
        return x.reshape(b, t, h, d).swapaxes(1, 2).reshape(b, kv, h // kv * t, d)

    d_out, out = stacked(d_out), stacked(out)
    dv = _transposed_times(probs, d_out)
    row = (d_out.astype(ms.float32) * out.astype(ms.float32)).sum(-1, keepdims=True)
    d_scores = probs.astype(ms.float32) * (_scores(d_out, v).astype(ms.float32) - row) * scale
    d_scores = d_scores.astype(q.dtype)
    dq = ops.matmul(d_scores, k).reshape(b, h, t, d)
    dk = _transposed_times(d_scores, q.reshape(b, kv, h // kv * t, d))
    return dq, dk, dv


def ascend_attention(q, k, v, mask, scale):
    """`mask` None: every key allowed (the kernel gets no mask at all)."""
    b, h, t, d = q.shape
    # The kernel's polarity is 1 = discard. A query with no key to attend (a left-padding row)
    # would get a result the kernel leaves undefined, and a NaN there reaches real rows in the next
    # layer (probability 0 x NaN value): such a row attends to every key instead, a finite result
    # nothing reads, as the exact path's uniform row is.
    discard = None if mask is None else \
        ops.logical_and(ops.logical_not(mask), mask.any(-1, keep_dims=True)).astype(ms.uint8)
    out = ops.flash_attention_score(q, k, v, h, attn_mask=discard, scalar_value=float(scale), input_layout="BNSD")
    return out.swapaxes(1, 2).reshape(b, t, h * d)


def attention(q, k, v, mask, scale, flash=False, past=None):
    """`past`: a cache's (keys, values) (B, KV, S, D) besides the new k, v (a decode step reads the
    cache where it lies and writes the new key after, nn/kv_cache.py); the mask then covers S + T
    keys, past first. Such a step attends exactly: the kernel would need the keys joined (a copy),
    and one query per row has nothing for it to tile."""
    if flash and past is None:
        return ascend_attention(q, k, v, mask, scale)
    return exact_attention(q, k, v, mask, scale, past)


# Scores exact attention over long segments holds at once (float32: 128 MB), query rows taken in
# chunks beyond it, op by op: a 1920 x 1080 image's full-attention blocks (one segment of 10764
# patches) had held 12 GB in the vision encoder's graph on the tiny checkpoint.
SCORES_AT_ONCE = 1 << 25


def segment_layout(lengths, segments=None, longest=None, rows=None, keys_only=False):
    """(gather, scatter, mask): how a flat sequence of N tokens, cut into consecutive segments of
    `lengths`, maps to a padded (segments, longest) batch, so attention within segments (the
    reference's `cu_seqlens`) runs as ordinary batched attention with a key padding mask.
    A compiled graph takes them padded to fixed sizes: `segments` segments (the extra ones empty),
    `longest` slots each (those past a segment's length masked) and `rows` output rows (those past
    N read token 0's). `keys_only`: the mask (segments, 1, 1, longest), the same for every query
    (op by op only: segmented_attention then takes exact attention's query rows in chunks, and
    gives the flash kernel no mask where no slot is padding)."""
    lengths = np.asarray(lengths, np.int64)
    segments, longest = segments or len(lengths), longest or int(lengths.max())
    lengths = np.pad(lengths, (0, segments - len(lengths)))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    offsets = np.arange(longest)
    valid = offsets[None, :] < lengths[:, None]
    scatter = np.flatnonzero(valid)
    scatter = np.pad(scatter, (0, (rows or len(scatter)) - len(scatter)))
    mask = valid[:, None, None, :]
    return (Tensor(np.where(valid, starts[:, None] + offsets[None, :], 0).reshape(-1).astype(np.int32)),
            Tensor(scatter.astype(np.int32)),
            Tensor(mask if keys_only else np.broadcast_to(mask, (segments, 1, longest, longest)).copy()))


def segmented_attention(q, k, v, layout, scale, flash=False):
    """q, k, v (N, H, D) for a flat sequence; each token attends only within its segment of
    `layout` (segment_layout). Returns (rows, H * D): N rows unless the layout was padded."""
    n, h, d = q.shape
    gather, scatter, mask = layout
    s, longest = mask.shape[0], mask.shape[-1]

    def batch(x):
        return ops.gather(x, gather, 0).reshape(s, longest, h, d).swapaxes(1, 2)

    q, k, v = batch(q), batch(k), batch(v)
    if mask.shape[2] == 1:  # a keys-only mask (long segments, op by op)
        # No padding (a picture, a video's frames of one size): no mask to apply, which op by op is
        # the costliest step (a `where` broadcast over the rows: 97 ms of a 230 ms chunk, measured)
        keys = None if bool(mask.all()) else mask
        if flash:  # the kernel holds no scores; it takes a full mask or none (a 12 MP photo's: ~4 GB)
            full = None if keys is None else ops.broadcast_to(keys, (s, 1, longest, longest))
            out = ascend_attention(q, k, v, full, scale)
        else:  # at most SCORES_AT_ONCE scores at a time
            step = max(1, SCORES_AT_ONCE // (s * h * longest))
            out = ops.cat([exact_attention(q[:, :, i:i + step], k, v, keys, scale)
                           for i in range(0, longest, step)], 1)
    else:
        out = attention(q, k, v, mask, scale, flash)
    return ops.gather(out.reshape(s * longest, h * d), scatter, 0)
