"""Parameter-holding layers whose attribute names match the Hugging Face checkpoints
(`weight`, `bias`), so weights load by name."""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Zero

from . import ops as P
from .device import on_ascend, storage_dtype


def empty_parameter(shape, dtype, name):
    # Lazily initialised: the loader overwrites it, so nothing is allocated twice.
    return Parameter(Tensor(shape=shape, dtype=storage_dtype(dtype), init=Zero()), name=name)


class Linear(nn.Cell):
    def __init__(self, in_features, out_features, bias=True, dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = empty_parameter((out_features, in_features), dtype, "weight")
        self.bias = empty_parameter((out_features,), dtype, "bias") if bias else None

    def construct(self, x):
        # P.linear, not mint's linear: op by op on the CPU mint's transposes the weight at each call
        # (the vision merger's 5120 x 5120: 390 ms against 87 ms)
        return P.linear(x, self.weight, self.bias)


class Conv1d(nn.Cell):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 dtype=ms.float32):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.weight = empty_parameter((out_channels, in_channels // groups, kernel_size), dtype, "weight")
        self.bias = empty_parameter((out_channels,), dtype, "bias") if bias else None

    def construct(self, x):
        return self.apply(x, self.weight, self.bias)

    def apply(self, x, weight, bias):
        """This convolution with the given weights (a graph that takes weights as inputs calls it)."""
        return P.conv1d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def apply_rows(self, x, weight, bias=None, same=None):
        """`apply` (stride 1, groups 1) on rows laid out (B, C, 1, L): the CPU's convolutions are 2-D,
        so a stack of them keeps this layout instead of reshaping around each (P.cpu_conv_rows).
        `same`: a native kernel (x, weight, dilation) of a "same"-padded convolution to run instead
        (bigvgan.py's SameConvolution), for a layer so padded."""
        if self.stride != 1 or self.groups != 1:
            raise ValueError(f"apply_rows takes stride 1 and groups 1, this layer has {self.stride} and {self.groups}")
        if same is None:
            out = P.cpu_conv_rows(x, weight, self.padding, self.dilation)
        elif 2 * self.padding == self.dilation * (weight.shape[-1] - 1):  # (the kernel takes (A, B, [1,] K))
            out = same(x, weight, Tensor(np.array([self.dilation], np.int32)))
        else:
            raise ValueError(f"a native same-padded convolution takes padding dilation * (K - 1) / 2, this layer has "
                             f"{self.padding}")
        return out if bias is None else ops.bias_add(out, bias)


class LayerNorm(nn.Cell):
    def __init__(self, size, eps=1e-5, dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = empty_parameter((size,), dtype, "weight")
        self.bias = empty_parameter((size,), dtype, "bias")

    def construct(self, x):
        return P.layer_norm(x, self.weight, self.bias, self.eps)


class GELU(nn.Cell):
    """Exact (erf) GELU as a layer, for checkpoints that number it inside a Sequential."""

    def construct(self, x):
        return P.gelu(x)


class RMSNorm(nn.Cell):
    def __init__(self, size, eps=1e-6, dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = empty_parameter((size,), dtype, "weight")

    def construct(self, x):
        return P.rms_norm(x, self.weight, self.eps)


class Embedding(nn.Cell):
    def __init__(self, num_embeddings, dim, dtype=ms.float32):
        super().__init__()
        self.weight = empty_parameter((num_embeddings, dim), dtype, "weight")

    def construct(self, ids):
        return P.embedding(ids, self.weight)

    def lookup(self, ids):
        """`construct` outside a graph, on host integer `ids` of any shape. On the CPU the rows are
        read from the table where it lies (the same values): an op-by-op Gather took 1-2 ms to build
        for each new shape and ~19 ms for a process's first, against ~0.1 ms here (the prompts' and
        the Talker's lookups, at a process's first answer)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.weight.shape[0]):
            raise ValueError(f"token ids must lie in 0..{self.weight.shape[0] - 1}; got {ids.min()}..{ids.max()}")
        if on_ascend():
            return self(Tensor(ids, ms.int32))
        return Tensor(self.weight.asnumpy()[ids])

