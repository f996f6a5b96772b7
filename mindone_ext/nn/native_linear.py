"""The CPU's large linear layers as one native kernel (kernels/linear.cc): x @ weight^T (+ bias)
through oneDNN's sgemm, which MindSpore ships and its own MatMul runs, on column slices of the
output, one per core. `nn/ops.exact_linear` takes it for MIN_ROWS rows or more against float32
weights of MIN_WEIGHT elements or more, once a model part has called `enable` (the kernels'
builders do, for float32 on the CPU).

Why: MindSpore's MatMul ran the encoders', a prompt's and the DiT's products slower (the 7B's
audio encoder on 2 s: 789-818 ms against 573-600 ms; bench/linear.py). Below MIN_WEIGHT the
kernel's call costs more than it saves, and so it does for a decode step's few rows: among a
step's many small kernels the 0.5B thinker decoded 8.9-9.1 tokens/s with it against 10.1-10.4
with MatMul (its prefill 534-575 ms against 687-702). Its gradient is MatMul's (`_gradient`):
adapters train through it."""
import os
from typing import Any, NamedTuple

import mindspore as ms
from mindspore import ops

ONEDNN = "libdnnl.so.2"
MIN_WEIGHT = 1 << 20  # elements (a 1024 x 1024 weight)
MIN_ROWS = 16


class LinearKernels(NamedTuple):
    plain: Any
    biased: Any
    library: str


KERNELS = None  # LinearKernels once `enable` built them (read by exact_linear, inside graphs too)

_times = ops.MatMul()
_transposed_times = ops.MatMul(transpose_a=True)


def _gradient(x, weight, out, d_out):
    return _times(d_out, weight), _transposed_times(d_out, x)


def _biased_gradient(x, weight, bias, out, d_out):
    return _times(d_out, weight), _transposed_times(d_out, x), d_out.sum(0)


def _out_shape(x, weight, *_):
    return [x[0], weight[0]]


def _out_dtype(x, *_):
    return x


def enable():
    """Build the kernel (once per machine) and let exact_linear take it; a no-op where native
    kernels are off (Ascend, $MINDONE_EXT_NATIVE_KERNELS=off), or without oneDNN or a compiler."""
    from ..utils import native_kernels  # (here: it imports utils.graph_cache, which imports nn)

    global KERNELS
    if KERNELS is not None or not native_kernels.enabled():
        return
    library = onednn_library("linear.cc")
    if library is None:
        return
    made = [ops.Custom(f"{library}:{name}", out_shape=_out_shape, out_dtype=_out_dtype, func_type="aot", bprop=bprop)
            for name, bprop in (("Linear", _gradient), ("LinearBias", _biased_gradient))]
    KERNELS = LinearKernels(*made, library)


def onednn_library(name):
    """The kernel source `name` built against MindSpore's own oneDNN (found where it lies), or None
    (native kernels off, no oneDNN beside MindSpore, no compiler)."""
    from ..utils import native_kernels

    folder = os.path.join(os.path.dirname(os.path.abspath(ms.__file__)), "lib")
    if not os.path.exists(os.path.join(folder, ONEDNN)):
        return None
    links = ("-L" + folder, "-l:" + ONEDNN, "-Wl,-rpath," + folder)
    return native_kernels.library(native_kernels.source(name), links)


def takes(rows, weight, dtype):
    """Whether exact_linear runs `weight` (out, in) on `rows` rows of `dtype` through the kernel."""
    return (KERNELS is not None and rows >= MIN_ROWS and dtype == ms.float32 and weight.dtype == ms.float32
            and weight.shape[0] * weight.shape[1] >= MIN_WEIGHT)


def library():
    """The kernel's file while exact_linear may take it, else None: part of a stored graph's key."""
    return None if KERNELS is None else KERNELS.library
