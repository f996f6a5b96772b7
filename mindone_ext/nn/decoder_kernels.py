"""A Qwen2 decoder step's native CPU kernels (kernels/decoder_step.cc: MindSpore AOT custom ops)
and the functions that use them or, without them (Ascend, another dtype, no compiler), the ops.

Why: on the CPU a decode step of a small decoder is bound by its kernel count (the tiny Talker's
step was 137 kernels, ~15 us each to launch against ~2 us of work), and each of these replaces a
chain: the RMS norm (6 kernels), the SiLU-gated unit (3) and a decode step's attention with its
rotary embedding, reading the cache where it lies (~30 per layer: rotations, the past's gather,
the two score and value products, mask, softmax). They are not used for training (no gradient)."""
from typing import Any, NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ..utils import native_kernels
from . import native_linear
from . import ops as P
from .kv_cache import write_step

SOURCE = native_kernels.source("decoder_step.cc")


def _attention_shapes(q, k, v, q_bias, k_bias, v_bias, cos, *_):
    new = [k[0] * k[2] // cos[2], cos[2]]
    return [q[0], 1, q[2]], new, new


def _attention_dtypes(q, *_):
    return q, q, q


class DecoderKernels(NamedTuple):
    """Each None for MindSpore ops. `libraries`: the built file's path, part of a graph's key."""
    rms_norm: Any = None
    silu_gate: Any = None
    decode_attention: Any = None
    libraries: tuple = ()

    @classmethod
    def build(cls, dtype):
        """Built for float32 on the CPU when a compiler is there (native_kernels.library), else ops."""
        if dtype != ms.float32:
            return cls()
        native_linear.enable()  # (its large linears too: nn/native_linear.py)
        library = native_kernels.library(SOURCE)
        if library is None:
            return cls()
        return cls(native_kernels.custom_op(library, "RMSNorm"), native_kernels.custom_op(library, "SiluGate"),
                   native_kernels.custom_op(library, "DecodeAttention", _attention_shapes, _attention_dtypes),
                   (library,))


def rms_norm(x, weight, eps, native=None):
    """Qwen2RMSNorm of x (..., E); `native`: DecoderKernels.rms_norm, or None for ops."""
    if native is None:
        return P.rms_norm(x, weight, eps)
    return native(x, weight, Tensor(np.array([eps], np.float32)))


def gated_unit(gate, up, act, native=None):
    """act(gate) * up, the gated MLP's middle; `native` (DecoderKernels.silu_gate) serves SiLU only."""
    if native is not None and act == "silu":
        return native(gate, up)
    return P.activation(act)(gate) * up


def decode_attention(q, k, v, biases, cos, sin, mask, heads, past, step, native):
    """nn/decoder.py's `attend` for a decode step (one token per row, `past` the layer's buffers)
    as one native kernel: q (B, 1, H * D), k and v (B, 1, KV * D) as projected, without their
    `biases` (q's, k's, v's), which the kernel adds; `step` as for kv_cache, its rows those of the
    buffers (also for a pool stepped whole). The new keys and values are written after the kernel
    has read the past. Returns (B, 1, H * D)."""
    rows, view = step[0], step[1]
    out, keys, values = native(q, k, v, *biases, cos, sin, past[0], past[1], rows, mask,
                               Tensor(np.array([heads[2] ** -0.5], np.float32)), Tensor(np.array([view[2]], np.int32)))
    out = ops.depend(out, write_step(past[0], keys, step))
    return ops.depend(out, write_step(past[1], values, step))
