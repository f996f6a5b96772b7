"""A Qwen2 decoder step's native CPU kernels (kernels/decoder_step.cc: MindSpore AOT custom ops)
and the functions that use them or, without them (Ascend, another dtype, no compiler), the ops.

Why: on the CPU a decode step of a small decoder is bound by its kernel count (the tiny Talker's
step was 137 kernels, ~15 us each to launch against ~2 us of work), and each of these replaces a
chain: the RMS norm (6 kernels), the SiLU-gated unit (3) and a cached step's attention with its
rotary embedding, a decode step's or a prompt piece's, reading the cache where it lies and
writing the step's keys and values into it (~35 per layer: rotations, the past's gather, the two
score and value products, mask, softmax, the writes' gathers and scatters). A loaded
graph's first call in a process also builds each of its kernels: the tiny checkpoint's prefill
graphs with the piece kernel build in ~28 ms, ~44 ms without (bench/cold_start.py). They are not
used for training (no gradient).
"""
from typing import Any, NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..utils import native_kernels
from . import native_linear
from . import ops as P

SOURCE = native_kernels.source("decoder_step.cc")
# A piece's attention natively only up to this many multiply-adds of its scores (tokens x slots x
# heads x head size): the kernel reads every key once per query (no tiling), so beyond it
# MindSpore's batched products are faster (a piece of 128 tokens in a compiled graph, ms native /
# ops: 4 x 16 heads over 256 slots, the tiny Thinker's, 1.6 / 2.4; 14 x 64 over 256, the 0.5B's,
# 6.2 / 5.9; over 512, 11.5 / 8.4; 12 x 128 over 256, 10.5 / 8.1). Below it a piece's cost is its
# kernels' launches, and a loaded graph's first call builds each kernel (~30 fewer a layer).
PIECE_MACS = 1 << 25


class DecoderKernels(NamedTuple):
    """Each None for MindSpore ops. `libraries`: the built file's path, part of a graph's key."""
    rms_norm: Any = None
    silu_gate: Any = None
    decode_attention: Any = None
    piece_attention: Any = None
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
                   native_kernels.custom_op(library, "DecodeAttention"),
                   native_kernels.custom_op(library, "PieceAttention"),
                   (library,))


def cached_attention_kernel(kernels, tokens, span, heads):
    """The native kernel for a cached step's attention of `tokens` per row over `span` slots with
    `heads` (H, KV, D, ...), or None (MindSpore ops)."""
    if tokens == 1:
        return kernels.decode_attention
    return kernels.piece_attention if tokens * span * heads[0] * heads[2] <= PIECE_MACS else None


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


def cached_attention(q, k, v, biases, cos, sin, mask, heads, past, step, native):
    """nn/decoder.py's `attend` with a cache (`past` the layer's buffers) as one native kernel
    (`cached_attention_kernel`'s): q (B, T, H * D), k and v (B, T, KV * D) as projected, or their
    (B * T, width) rows (cos, sin (B, T, D) tell B and T), without their `biases` (q's, k's, v's),
    which the kernel adds; `step` as for kv_cache, its rows those of the buffers (also for a pool
    stepped whole). The kernel writes the new keys and values into the buffers itself, by the
    step's write plan, after it has read the past. Returns q's shape."""
    rows, view, _, pick, slots = step
    scale, per_row = Tensor(np.array([heads[2] ** -0.5], np.float32)), Tensor(np.array([view[2]], np.int32))
    return native(q, k, v, *biases, cos, sin, past[0], past[1], rows, slots, pick, mask, scale, per_row)
