"""The model's native CPU kernels (kernels/*.cc) against the same functions as MindSpore ops.
BigVGAN's anti-aliased activation (kernels/anti_aliased_snake.cc) against the activation as ops
(itself at parity with the reference through test_speech.py's BigVGAN test, which runs both):
every row length and real length near the edges of the filters' padding, rows of a padded
window, inputs large enough to need the sine's range reduction, op by op and inside a compiled
graph."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindone_ext.models.qwen2_5_omni.bigvgan import KERNEL_SOURCE, AntiAliasedActivation
from mindone_ext.nn.device import on_ascend
from mindone_ext.utils import native_kernels
from tests.conftest import max_abs_diff

pytestmark = pytest.mark.skipif(on_ascend(), reason="the native kernel is the CPU target's; Ascend runs the ops")
CHANNELS = 3
rng = np.random.default_rng(5)


@pytest.fixture(scope="module")
def activations():
    """(native, ops): the same activation with the same weights, through the kernel and through ops."""
    library = native_kernels.library(KERNEL_SOURCE)
    assert library is not None, "this machine builds the native kernel (CI installs g++)"
    native, plain = AntiAliasedActivation(CHANNELS, ms.float32, library), AntiAliasedActivation(CHANNELS, ms.float32)
    assert native.fused is not None and plain.fused is None
    alpha = Tensor(rng.uniform(-1, 1.5, CHANNELS).astype(np.float32))
    beta = Tensor(rng.uniform(-1, 1, CHANNELS).astype(np.float32))
    return native, plain, alpha, beta


def both(activations, x, valid):
    native, plain, alpha, beta = activations
    valid = None if valid is None else Tensor(np.int32(valid))
    return (native.apply(Tensor(x), valid, alpha, beta).asnumpy(),
            plain.apply(Tensor(x), valid, alpha, beta).asnumpy())


def test_every_length_and_real_length_near_the_padding_edges(activations):
    # the filters reach 3 input samples and 6 upsampled ones past a sample: lengths around them,
    # and around a window's width, each with real lengths from the shortest a window has (5
    # samples: one frame at the first stage) to the whole row
    for n in list(range(6, 20)) + [237, 238, 239, 240, 241]:
        for valid in sorted(v for v in {5, 6, 7, n // 2, n - 3, n - 2, n - 1, n} if 5 <= v <= n):
            x = (rng.standard_normal((2, CHANNELS, n)) * 2).astype(np.float32)
            x[..., valid:] = rng.standard_normal((2, CHANNELS, n - valid)) * 50  # padding: must not leak in
            got, want = both(activations, x, valid)
            assert max_abs_diff(got[..., :valid], want[..., :valid]) <= 1e-5, (n, valid)
            assert not got[..., valid:].any(), (n, valid)  # past the real samples: zeros, as the next conv needs
            alone, _ = both(activations, x[..., :valid], None)  # the real samples alone: the same output
            assert max_abs_diff(got[..., :valid], alone) <= 1e-5, (n, valid)


def test_large_inputs_go_through_the_sine_range_reduction(activations):
    x = (rng.standard_normal((1, CHANNELS, 400)) * 3000).astype(np.float32)
    got, want = both(activations, x, None)
    # values of ~1e4: float32's spacing there is ~1e-3, so compare relative to the input's scale
    assert max_abs_diff(got, want) <= 1e-6 * np.abs(x).max() * 10
    assert np.abs(want).mean() > 100


def test_inside_a_compiled_graph(activations):
    native, plain, alpha, beta = activations
    x, valid = (rng.standard_normal((1, CHANNELS, 300)) * 2).astype(np.float32), Tensor(np.int32(250))

    @ms.jit
    def compiled(x, valid):
        return native.apply(x, valid, alpha, beta)

    got = compiled(Tensor(x), valid).asnumpy()
    want = plain.apply(Tensor(x), valid, alpha, beta).asnumpy()
    assert max_abs_diff(got[..., :250], want[..., :250]) <= 1e-5 and not got[..., 250:].any()
