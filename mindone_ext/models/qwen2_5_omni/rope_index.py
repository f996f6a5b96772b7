"""TMRoPE position ids (3, B, T) and rope deltas, computed on the host with numpy.

Mirrors the reference's `get_rope_index`. Text-only prompts: positions count the real
(non-padding) tokens; padding slots get position 1, as in the reference.
"""
import numpy as np


def text_rope_index(attention_mask):
    """attention_mask (B, T) of 0/1 -> position_ids (3, B, T) int64, rope_deltas (B, 1) int64.

    rope_deltas is what decoding adds to a cache slot to get the next position id."""
    mask = np.asarray(attention_mask).astype(np.int64)
    positions = np.cumsum(mask, -1) - 1
    positions[mask == 0] = 1
    position_ids = np.broadcast_to(positions, (3,) + positions.shape).copy()
    # Reference: (max position + 1 - real length) minus the number of pads.
    deltas = positions.max(-1, keepdims=True) + 1 - mask.sum(-1, keepdims=True) - (1 - mask).sum(-1, keepdims=True)
    return position_ids, deltas
