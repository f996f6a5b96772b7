"""The audio and vision encoders' native CPU kernels: element-wise steps (kernels/encoder_layer.cc,
and the RMS norm of kernels/decoder_step.cc), attention within segments (kernels/segment_attention.cc),
and the functions that use them or, without them (Ascend, another dtype, no compiler), the ops.

Why: around the matrix products of an encoder layer MindSpore's CPU kernels each take a pass over
the tokens, slowly (in a graph, a 7B-shaped audio layer on 100 tokens: 38 ms a layer with the ops,
32 ms with these; a vision block on 1024 patches: 291 ms, 248 ms; medians of alternating calls).
Its attention likewise: rotating q and k and attending in 16 windows of 64 patches took 20-33 ms
as ops, 4 ms as the kernel; over one frame of 1024 patches 84-140 ms, 36-52 ms; an audio layer's
over 100 tokens ~1.5 ms (the 7B's audio encoder on 2 s: 698 ms -> 626 ms)."""
from typing import Any, NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..utils import native_kernels
from . import native_linear
from . import ops as P

SOURCE = native_kernels.source("encoder_layer.cc")
DECODER_SOURCE = native_kernels.source("decoder_step.cc")  # its RMSNorm (decoder_kernels.rms_norm calls it)


class EncoderKernels(NamedTuple):
    """Each None for MindSpore ops. `libraries`: the built files' paths, part of a graph's key."""
    layer_norm: Any = None
    rms_norm: Any = None
    gelu_bias: Any = None
    bias_residual: Any = None
    segment_attention: Any = None  # kernels/segment_attention.cc: attention within segments (audio)
    rotary_attention: Any = None  # the same with q and k rotated (vision)
    libraries: tuple = ()

    @classmethod
    def build(cls, dtype):
        """Built for float32 on the CPU when a compiler is there (native_kernels.library), else ops."""
        if dtype != ms.float32:
            return cls()
        native_linear.enable()  # (its large linears too: nn/native_linear.py)
        library, decoder = native_kernels.library(SOURCE), native_kernels.library(DECODER_SOURCE)
        if library is None or decoder is None:
            return cls()
        ops = [native_kernels.custom_op(library, name) for name in ("LayerNorm", "GeluBias", "BiasResidual")]
        attention = native_linear.onednn_library("segment_attention.cc")  # (None without oneDNN: the ops attend)
        return cls(ops[0], native_kernels.custom_op(decoder, "RMSNorm"), *ops[1:],
                   native_kernels.custom_op(attention, "SegmentAttention"),
                   native_kernels.custom_op(attention, "RotarySegmentAttention"), (library, decoder, attention))


def segment_table(lengths, starts=None, count=None):
    """The attention kernels' segments: (first row, length) of each, int32, the count padded to
    `count` (empty segments at the end); first rows consecutive unless `starts` gives them."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if starts is None else np.asarray(starts, np.int64)
    table = np.stack([starts, lengths], 1)
    end = int(starts[-1] + lengths[-1]) if len(lengths) else 0
    padding = np.tile([[end, 0]], ((count or len(lengths)) - len(lengths), 1))
    return Tensor(np.concatenate([table, padding]).astype(np.int32))


def _eps(eps):
    return Tensor(np.array([eps], np.float32))


def layer_norm(x, weight, bias, eps, native=None):
    if native is None:
        return P.layer_norm(x, weight, bias, eps)
    return native(x, weight, bias, _eps(eps))


def act_bias(x, bias, act, name, native=None):
    """act(x + bias), `native` (EncoderKernels.gelu_bias) serving the erf GELU ("gelu") only."""
    if native is not None and name == "gelu":
        return native(x, bias)
    return act(x + bias)


def bias_residual(x, y, bias, native=None):
    """x + (y + bias): a residual around a projection computed without its bias."""
    if native is None:
        return x + (y + bias)
    return native(x, y, bias)
