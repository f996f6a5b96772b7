"""Portable ops: the fused Ascend kernel on Ascend, a CPU-registered equivalent elsewhere.

Each op `x` dispatches between `ascend_x` (the kernel that only Ascend registers) and `exact_x`
(ops that have CPU kernels, with the reference's numerics). Model code calls only the
dispatching names; tests call both sides directly.
"""
import math

import mindspore as ms
from mindspore import mint, ops

from . import native_linear
from .device import on_ascend

# ---------------------------------------------------------------- normalisation


def ascend_rms_norm(x, weight, eps):
    return ops.rms_norm(x, weight, eps)[0]


def exact_rms_norm(x, weight, eps):
    # Qwen2RMSNorm: statistics in float32, scale applied in the input dtype.
    dtype = x.dtype
    h = x.astype(ms.float32)
    h = h * ops.rsqrt((h * h).mean(-1, keep_dims=True) + eps)
    return weight * h.astype(dtype)


def rms_norm(x, weight, eps):
    if on_ascend():
        return ascend_rms_norm(x, weight, eps)
    return exact_rms_norm(x, weight, eps)


def ascend_layer_norm(x, weight, bias, eps):
    return mint.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def exact_layer_norm(x, weight, bias, eps):
    # statistics in float32, affine in the input dtype; ops.LayerNorm is one CPU kernel, ~3x
    # faster than the mean/variance/rsqrt it replaces (7 kernels), and as close to the reference
    dtype, n = x.dtype, x.shape[-1]
    h = ops.LayerNorm(-1, -1, eps)(x.astype(ms.float32), ops.ones((n,), ms.float32), ops.zeros((n,), ms.float32))[0]
    h = h.astype(dtype)
    if weight is not None:
        h = h * weight
    if bias is not None:
        h = h + bias
    return h


def layer_norm(x, weight, bias, eps):
    if on_ascend():
        return ascend_layer_norm(x, weight, bias, eps)
    return exact_layer_norm(x, weight, bias, eps)


# ---------------------------------------------------------------- activations


def ascend_gelu(x, approximate="none"):
    return mint.nn.functional.gelu(x, approximate=approximate)


GELU_TANH_SCALE = 2 * math.sqrt(2 / math.pi)


def exact_gelu(x, approximate="none"):
    if approximate == "tanh":
        # 0.5 x (1 + tanh(u)) is x sigmoid(2u): the same function, and MindSpore's CPU sigmoid
        # is ~3.5x faster than its GeLU(tanh) kernel (measured; within 6e-7 of torch's)
        return x * ops.sigmoid(x * (GELU_TANH_SCALE + (GELU_TANH_SCALE * 0.044715) * x * x))
    return ops.gelu(x, approximate=approximate)


def gelu(x, approximate="none"):
    if on_ascend():
        return ascend_gelu(x, approximate)
    return exact_gelu(x, approximate)


def silu(x):
    # x * sigmoid(x) has CPU kernels everywhere; one formula serves both devices.
    return x * ops.sigmoid(x)


# ---------------------------------------------------------------- linear

_times_transposed = ops.MatMul(transpose_b=True)


def ascend_linear(x, weight, bias=None):
    return mint.nn.functional.linear(x, weight, bias)


def exact_linear(x, weight, bias=None):
    # x @ weight.T: many rows of a large float32 weight through the native kernel (nn/native_linear.py), others
    # through MatMul, in a graph the same kernels mint's linear runs on the CPU (bit for bit),
    # where MindSpore has no Dense kernel and expands it at each compile, reshapes sized at run
    # time by a ShapeCalc node; here the shapes are constants. A loaded graph of 40 linears: first
    # call 30 -> 13 ms, later calls 2.3 -> 1.3 ms (measured, bench/cold_start.py's graphs likewise)
    # rows in, rows out with no reshape (a compiled decoder step keeps its activations as rows:
    # a reshape is a kernel there, each ~0.3 ms to build at a loaded graph's first call)
    rows = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
    shape = x.shape[:-1] + (weight.shape[0],)
    if native_linear.takes(rows.shape[0], weight, x.dtype):
        kernels = native_linear.KERNELS
        out = kernels.plain(rows, weight) if bias is None else kernels.biased(rows, weight, bias)
    else:
        out = _times_transposed(rows, weight)
        out = out if bias is None else out + bias
    return out if x.ndim == 2 else out.reshape(shape)


def linear(x, weight, bias=None):
    if on_ascend():
        return ascend_linear(x, weight, bias)
    return exact_linear(x, weight, bias)


# ---------------------------------------------------------------- lookups and ranges


def ascend_embedding(ids, table):
    return mint.nn.functional.embedding(ids, table)


def exact_embedding(ids, table):
    return ops.gather(table, ids, 0)


def embedding(ids, table):
    if on_ascend():
        return ascend_embedding(ids, table)
    return exact_embedding(ids, table)


def ascend_arange(n, dtype=ms.int32):
    return mint.arange(0, n, dtype=dtype)


def exact_arange(n, dtype=ms.int32):
    return ops.arange(0, n, dtype=dtype)


def arange(n, dtype=ms.int32):
    if on_ascend():
        return ascend_arange(n, dtype)
    return exact_arange(n, dtype)


def gelu_tanh(x):
    return gelu(x, "tanh")


def quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


ACTIVATIONS = {"silu": silu, "swish": silu, "gelu": gelu, "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh,
               "quick_gelu": quick_gelu, "relu": ops.relu}


def activation(name):
    """The activation a Hugging Face config names (`hidden_act`, `activation_function`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ---------------------------------------------------------------- convolution


def ascend_conv1d(x, weight, bias, stride=1, padding=0, dilation=1, groups=1):
    return mint.nn.functional.conv1d(x, weight, bias, stride, padding, dilation, groups)


def exact_conv1d(x, weight, bias, stride=1, padding=0, dilation=1, groups=1):
    out = ops.conv1d(x, weight, None, stride, "pad" if padding else "valid", padding, dilation, groups)
    return out if bias is None else out + bias.reshape(1, -1, 1)


def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """x (B, C_in, L), weight (C_out, C_in / groups, K): torch.nn.functional.conv1d semantics."""
    if on_ascend():
        return ascend_conv1d(x, weight, bias, stride, padding, dilation, groups)
    return exact_conv1d(x, weight, bias, stride, padding, dilation, groups)


def pad1d(x, left, right, mode="constant"):
    """Pad the last axis; mode "constant" (zeros), "reflect" or "replicate", as torch's F.pad.
    ops.pad has CPU kernels for all three; Ascend registers them too."""
    return ops.pad(x, (left, right), mode=mode)


def conv_transpose1d(x, weight, bias=None, stride=1, padding=0, groups=1):
    """torch.nn.functional.conv_transpose1d (weight (C_in, C_out / groups, K))."""
    if groups == 1 and not on_ascend():
        return cpu_conv_transpose1d(x, weight, bias, stride, padding)
    return portable_conv_transpose1d(x, weight, bias, stride, padding, groups)


def cpu_conv_transpose1d(x, weight, bias=None, stride=1, padding=0):
    """`conv_transpose1d` as the CPU's deconvolution kernel (ops.Conv2DTranspose over a height of
    1): 4-7x faster there than a convolution over the zero-stuffed input (measured at BigVGAN's
    upsampling layers, tiny and 7B shapes), which multiplies the stride - 1 inserted zeros too."""
    out = cpu_conv_transpose_rows(x.expand_dims(2), weight, stride, padding).squeeze(2)
    return out if bias is None else out + bias.reshape(1, -1, 1)


def cpu_conv_transpose_rows(x, weight, stride=1, padding=0):
    """`cpu_conv_transpose1d` (no bias) of rows laid out (B, C_in, 1, L), as `cpu_conv_rows`."""
    b, _, _, length = x.shape
    c_out, k = weight.shape[1], weight.shape[-1]
    deconv = ops.Conv2DTranspose(c_out, (1, k), pad_mode="pad", pad=(0, 0, padding, padding), stride=(1, stride))
    return deconv(x, _with_height(weight), (b, c_out, 1, (length - 1) * stride - 2 * padding + k))


def cpu_conv_rows(x, weight, padding=0, dilation=1):
    """torch's conv1d (stride 1, no bias, groups 1) of rows laid out (B, C_in, 1, L), weight
    (C_out, C_in, K) or already (C_out, C_in, 1, K), as the CPU's Conv2D over a height of 1: a stack
    of such layers keeps its rows 4-D between them instead of reshaping around each (two kernels of
    a graph per layer; a graph given 4-D weights reshapes none of them either)."""
    conv = ops.Conv2D(weight.shape[0], (1, weight.shape[-1]), pad_mode="pad", pad=(0, 0, padding, padding),
                      dilation=(1, dilation))
    return conv(x, _with_height(weight))


def _with_height(weight):
    """A 1-D convolution's weight (A, B, K) as the 2-D kernel's (A, B, 1, K)."""
    return weight if weight.ndim == 4 else weight.expand_dims(2)


def portable_conv_transpose1d(x, weight, bias=None, stride=1, padding=0, groups=1):
    """`conv_transpose1d` written as a convolution over the input with stride-1 zeros inserted
    between samples and the kernel flipped: the same sums, through the portable conv1d on every
    device and for any groups."""
    b, c, length = x.shape
    k = weight.shape[-1]
    if stride > 1:
        spread = ops.cat((x.expand_dims(-1), ops.zeros((b, c, length, stride - 1), x.dtype)), -1)
        x = spread.reshape(b, c, length * stride)[..., :(length - 1) * stride + 1]
    x = pad1d(x, k - 1 - padding, k - 1 - padding)
    c_in, c_out_per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, c_in // groups, c_out_per_group, k).swapaxes(1, 2)
    w = ops.reverse(w.reshape(groups * c_out_per_group, c_in // groups, k), [-1])
    return conv1d(x, w, bias, 1, 0, 1, groups)
