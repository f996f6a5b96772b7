"""Scaled dot-product attention behind one function: Ascend's fused flash kernel or exact math.

Layouts: q (B, H, T, D), k and v (B, KV, S, D) with H a multiple of KV (grouped-query
attention), mask (B, 1, T, S) boolean, True where a query may attend a key.
Returns (B, T, H * D).
"""
import mindspore as ms
from mindspore import ops

from .device import on_ascend

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def check_attn_implementation(name):
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    return name


def use_flash(attn_implementation, dtype):
    """Flash attention runs only on Ascend and only in half precision; elsewhere the exact
    path gives the same numerics whichever implementation was asked for."""
    return attn_implementation == "flash_attention_2" and on_ascend() and dtype in (ms.float16, ms.bfloat16)


def exact_attention(q, k, v, mask, scale):
    b, h, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    # Grouped-query attention without repeating k/v: the g query heads that share a kv head
    # (reference repeat_kv order: head = kv_index * g + r) are stacked along the query axis.
    scores = ops.matmul(q.reshape(b, kv, g * t, d), k.swapaxes(-1, -2)) * scale
    scores = scores.reshape(b, kv, g, t, s).astype(ms.float32)
    # A finite floor, not -inf: fully masked rows (left padding) stay finite, as in the reference.
    floor = ops.full_like(scores, -3.4028234663852886e38)
    scores = ops.where(mask.expand_dims(2), scores, floor)
    probs = ops.softmax(scores, -1).astype(q.dtype)
    out = ops.matmul(probs.reshape(b, kv, g * t, s), v)
    return out.reshape(b, h, t, d).swapaxes(1, 2).reshape(b, t, h * d)


def ascend_attention(q, k, v, mask, scale):
    b, h, t, d = q.shape
    discard = ops.logical_not(mask).astype(ms.uint8)
    out = ops.flash_attention_score(q, k, v, h, attn_mask=discard, scalar_value=scale, input_layout="BNSD")
    return out.swapaxes(1, 2).reshape(b, t, h * d)


def attention(q, k, v, mask, scale, flash=False):
    if flash:
        return ascend_attention(q, k, v, mask, scale)
    return exact_attention(q, k, v, mask, scale)
