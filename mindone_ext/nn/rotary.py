"""Rotary position embeddings: the 3-section multimodal rope (TMRoPE) of Qwen2.5-Omni."""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .device import on_ascend


def rope_inv_freq(dim, theta):
    # Same float32 arithmetic as the reference's default rope init.
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


def half_rotation(head_dim):
    """(head_dim, head_dim) matrix R with x @ R = rotate_half(x), exactly: each output is one
    input or its negation."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), np.float32)
    r[half:, :half] = -np.eye(half, dtype=np.float32)
    r[:half, half:] = np.eye(half, dtype=np.float32)
    return r


def apply_rotary(x, cos, sin):
    """x (B, heads, T, D); cos/sin (B, T, D). On the CPU rotate_half is one matmul: 1 kernel where
    slicing, negating and joining took 4 (a decode step's cost there is mostly per kernel). On
    Ascend it stays element-wise: a float32 matmul there may round its inputs (fp16 or HF32
    precision modes), and the rotation must stay exact."""
    cos, sin = cos.expand_dims(1), sin.expand_dims(1)
    turned = rotate_half(x) if on_ascend() else ops.matmul(x, Tensor(half_rotation(x.shape[-1]), x.dtype))
    return x * cos + turned * sin


def rotary_backward(grad, cos, sin):
    """The gradient of apply_rotary's input for the gradient of its output: the rotation
    transposed (rotate_half's transpose maps (z1, z2) to (z2, -z1))."""
    cos, sin = cos.expand_dims(1), sin.expand_dims(1)
    z = grad * sin
    half = z.shape[-1] // 2
    return grad * cos + ops.cat((z[..., half:], -z[..., :half]), -1)


class MultimodalRotaryEmbedding(nn.Cell):
    """cos/sin for position ids of shape (3, B, T): temporal, height and width sections.

    The reference computes a table per axis and then picks, channel by channel, the axis its
    section belongs to (mrope_section repeated twice over the head dim). Here one (3, D)
    matrix does both: row k holds inv_freq on the channels of axis k and zeros elsewhere, so
    `positions @ matrix` gives each channel position * inv_freq with a single rounding.
    """

    def __init__(self, head_dim, theta, mrope_section):
        super().__init__()
        if 2 * sum(mrope_section) != head_dim:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        inv_freq = np.concatenate([rope_inv_freq(head_dim, theta)] * 2)
        axis_of_channel = np.concatenate([np.full(n, i % 3) for i, n in enumerate(list(mrope_section) * 2)])
        table = np.zeros((3, head_dim), np.float32)
        table[axis_of_channel, np.arange(head_dim)] = inv_freq
        self.table = Tensor(table)

    def construct(self, position_ids, dtype=ms.float32):
        positions = position_ids.astype(ms.float32).transpose(1, 2, 0)  # (B, T, 3)
        freqs = ops.matmul(positions, self.table)  # (B, T, D)
        return ops.cos(freqs).astype(dtype), ops.sin(freqs).astype(dtype)
