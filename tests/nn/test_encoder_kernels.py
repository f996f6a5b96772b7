"""The encoders' native CPU kernels (kernels/encoder_layer.cc) against torch and against the same
functions as MindSpore ops (Ascend's path, held to the reference before the kernels came; the
encoders' reference tests, tests/models, now run the kernels on the CPU): the layer norm, GELU of
x + bias over the range its erf is fitted on and past it, the biased residual; row counts on each
side of the point where a kernel splits its rows between threads; op by op and compiled."""
import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor

from mindone_ext.nn.device import on_ascend
from mindone_ext.nn.encoder_kernels import EncoderKernels, act_bias, bias_residual, layer_norm
from mindone_ext.nn import ops as P
from tests.conftest import max_abs_diff

pytestmark = pytest.mark.skipif(on_ascend(), reason="the native kernels are the CPU target's; Ascend runs the ops")
rng = np.random.default_rng(5)
SPLIT = 1 << 16  # values a kernel gives each thread at least (VALUES_PER_THREAD in encoder_layer.cc)
# (rows, width): one row; rows one short of, at and one past two threads' worth at the 7B encoders' width
SHAPES = [(1, 64), (3, 5, 64)] + [(rows, 1280) for rows in (2 * SPLIT // 1280 - 1, 2 * SPLIT // 1280,
                                                            2 * SPLIT // 1280 + 1, 100)]


@pytest.fixture(scope="module")
def kernels():
    built = EncoderKernels.build(ms.float32)
    assert built.libraries, "this machine builds the native kernels (CI installs g++)"
    assert EncoderKernels.build(ms.float16) == EncoderKernels(), "float32 only: other dtypes run the ops"
    return built


def compiled_and_op_by_op(function, *inputs):
    """`function`'s outputs op by op and inside a compiled graph (they must agree exactly)."""
    eager = function(*inputs).asnumpy()
    graph = ms.jit(function)(*inputs).asnumpy()
    np.testing.assert_array_equal(graph, eager)
    return eager


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("magnitude", [1e-2, 1.0, 300.0])
def test_layer_norm(kernels, shape, magnitude):
    x = (rng.standard_normal(shape) * magnitude + magnitude).astype(np.float32)
    weight, bias = (rng.uniform(-2, 2, shape[-1]).astype(np.float32) for _ in range(2))

    def native(x, w, b):
        return layer_norm(x, w, b, 1e-5, kernels.layer_norm)

    got = compiled_and_op_by_op(native, Tensor(x), Tensor(weight), Tensor(bias))
    want = torch.nn.functional.layer_norm(torch.tensor(x), shape[-1:], torch.tensor(weight), torch.tensor(bias),
                                          1e-5).numpy()
    ops = P.layer_norm(Tensor(x), Tensor(weight), Tensor(bias), 1e-5).asnumpy()
    assert got.shape == shape and max_abs_diff(got, want) <= 1e-5 and max_abs_diff(got, ops) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gelu_of_x_plus_bias(kernels, shape):
    """Values across erf's fitted range (|x| / sqrt(2) <= 4) and well past it, where GELU is x or 0."""
    x = rng.uniform(-12, 12, shape).astype(np.float32)
    x.reshape(-1)[:7] = [0.0, -0.0, 5.65, 5.66, -5.66, 40.0, -40.0]
    bias = rng.uniform(-0.5, 0.5, shape[-1]).astype(np.float32)

    def native(x, b):
        return act_bias(x, b, P.activation("gelu"), "gelu", kernels.gelu_bias)

    got = compiled_and_op_by_op(native, Tensor(x), Tensor(bias))
    want = torch.nn.functional.gelu(torch.tensor(x) + torch.tensor(bias)).numpy()
    ops = act_bias(Tensor(x), Tensor(bias), P.activation("gelu"), "gelu").asnumpy()
    assert got.shape == shape and np.isfinite(got).all()
    assert max_abs_diff(got, want) <= 5e-6 and max_abs_diff(got, ops) <= 5e-6
    # another activation runs the ops whatever the kernels
    silu = act_bias(Tensor(x), Tensor(bias), P.activation("silu"), "silu", kernels.gelu_bias).asnumpy()
    assert max_abs_diff(silu, torch.nn.functional.silu(torch.tensor(x) + torch.tensor(bias)).numpy()) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_residual(kernels, shape):
    x, y = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    bias = rng.standard_normal(shape[-1]).astype(np.float32)

    def native(x, y, b):
        return bias_residual(x, y, b, kernels.bias_residual)

    got = compiled_and_op_by_op(native, Tensor(x), Tensor(y), Tensor(bias))
    np.testing.assert_array_equal(got, x + (y + bias))  # the same two float32 sums, in the same order
    np.testing.assert_array_equal(got, bias_residual(Tensor(x), Tensor(y), Tensor(bias)).asnumpy())


def test_a_kernel_given_another_dtype_fails_rather_than_misreads_it(kernels):
    x = Tensor(np.ones((2, 64), np.float16))
    with pytest.raises(Exception):
        bias_residual(x, x, Tensor(np.ones(64, np.float16)), kernels.bias_residual).asnumpy()
