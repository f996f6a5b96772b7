"""The model's native CPU kernels (kernels/*.cc) against the same functions as MindSpore ops
(themselves at parity with the reference through test_speech.py's BigVGAN and DiT tests, which run
both ways). BigVGAN's anti-aliased activation: every row length and real length near the edges of
the filters' padding, rows of a padded window, inputs large enough to need the sine's range
reduction; its variants that add a convolution's bias first, or a residual sum (which they also
return), on rows laid out (B, C, n) and (B, C, 1, n); its narrow "same"-padded convolution at every
row length near the padding and block edges; a whole AMP block as one kernel. The DiT's rotary
window attention: every frame count near the block boundaries, padded lengths, a frame count per
row, each layer's window shape; its modulated norm and gated residual:
per-row and shared modulation, the tiny and the released widths, rows far from zero; its GELU; and
the whole block as one kernel against the same block as ops (frame counts near the block
boundaries, guided rows sharing a time, rows with their own). Op by op and inside a compiled graph."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindone_ext.models.qwen2_5_omni.bigvgan import (NATIVE_CONVOLUTION_CHANNELS, AMPBlock, AntiAliasedActivation,
                                                     narrow_convolution, snake_kernels, vocoder_library)
from mindone_ext.models.qwen2_5_omni.dit import (ATTENTION_SOURCE, DiTKernels, attention_kernel, block_window,
                                                 dit_layer, gated_residual, gelu_tanh, modulated_norm,
                                                 rotary_window_attention, rotation_tables)
from mindone_ext.nn.device import on_ascend
from mindone_ext.nn.layers import Conv1d
from mindone_ext.utils import native_kernels
from tests.conftest import max_abs_diff

pytestmark = pytest.mark.skipif(on_ascend(), reason="the native kernel is the CPU target's; Ascend runs the ops")
CHANNELS = 3
rng = np.random.default_rng(5)


@pytest.fixture(scope="module")
def activations():
    """(native, ops): the same activation with the same weights, through the kernel and through ops."""
    library = vocoder_library()
    assert library is not None, "this machine builds the native kernel (CI installs g++)"
    native, plain = AntiAliasedActivation(CHANNELS, ms.float32, library), AntiAliasedActivation(CHANNELS, ms.float32)
    assert native.fused is not None and plain.fused is None
    alpha = Tensor(rng.uniform(-1, 1.5, CHANNELS).astype(np.float32))
    beta = Tensor(rng.uniform(-1, 1, CHANNELS).astype(np.float32))
    return native, plain, alpha, beta


# The kernel takes e^alpha and e^beta itself (float32, correctly rounded: 1.5e-7 relative), MindSpore's
# CPU Exp is off by up to 3.2e-6 (measured): on phases |x e^alpha| ~ 10 the ops' output moves by ~3e-5.
# So the kernel is held to 1e-5 of the reference's activation (torch's exp is exact to an ulp), and
# to the ops at this wider bound; BigVGAN both ways within 1e-4 of the reference (test_speech.py).
TOLERANCE = 5e-5


def reference_activation(x, alpha, beta):
    """The reference's TorchActivation1d(SnakeBeta) on x (B, C, n), every sample real."""
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import SnakeBeta, TorchActivation1d

    act = SnakeBeta(CHANNELS)
    with torch.no_grad():
        act.alpha.copy_(torch.tensor(alpha.asnumpy()))
        act.beta.copy_(torch.tensor(beta.asnumpy()))
        return TorchActivation1d(act)(torch.tensor(x)).numpy()


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
            assert max_abs_diff(got[..., :valid], want[..., :valid]) <= TOLERANCE, (n, valid)
            # past the real samples: zeros both ways, as the next (zero-padded) convolution needs
            assert not got[..., valid:].any() and not want[..., valid:].any(), (n, valid)
            alone, _ = both(activations, x[..., :valid], None)  # the real samples alone: the same output
            assert max_abs_diff(got[..., :valid], alone) <= 1e-5, (n, valid)
            reference = reference_activation(x[..., :valid], *activations[2:])
            assert max_abs_diff(got[..., :valid], reference) <= 1e-5, (n, valid)


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
    assert max_abs_diff(got[..., :250], want[..., :250]) <= TOLERANCE and not got[..., 250:].any()


@pytest.mark.parametrize("inputs, outputs, taps, dilation", [(2, 1, 7, 1), (1, 3, 3, 1), (4, 4, 3, 5), (8, 8, 7, 3),
                                                             (3, 5, 11, 5), (16, 2, 4, 2), (32, 32, 7, 1),
                                                             (64, 64, 11, 5)])
def test_same_convolution_at_every_length_near_the_padding_and_block_edges(inputs, outputs, taps, dilation):
    """SameConvolution against MindSpore's convolution (the ops, at parity with the reference
    through test_speech.py): rows shorter than the padding (every output sums fewer taps), every
    length around twice the padding, and around each block width the kernel may take (128, 256
    or 512 samples, by the unrolled rows); 2 rows a batch."""
    same = snake_kernels(vocoder_library()).same_convolution
    assert same is not None, "this machine builds the native convolution (MindSpore ships oneDNN)"
    pad = dilation * (taps - 1) // 2
    layer = Conv1d(inputs, outputs, taps, 1, pad, dilation)
    weight = Tensor(rng.standard_normal((outputs, inputs, 1, taps)).astype(np.float32))
    edges = {m * block + d for block in (128, 256, 512) for m in (1, 2) for d in (-1, 0, 1)}
    lengths = sorted(set(range(1, 2 * pad + 4)) | edges | {1024 + pad, 1025 + pad})
    for n in lengths:
        x = Tensor(rng.standard_normal((2, inputs, 1, n)).astype(np.float32))
        got = layer.apply_rows(x, weight, same=same).asnumpy()
        want = layer.apply_rows(x, weight).asnumpy()
        assert got.shape == want.shape == (2, outputs, 1, n)
        assert max_abs_diff(got, want) <= 1e-5 * max(1.0, float(np.abs(want).max())), f"length {n}"
    x = Tensor(rng.standard_normal((2, inputs, 1, 300)).astype(np.float32))

    @ms.jit
    def compiled(x, weight):
        return layer.apply_rows(x, weight, same=same)

    np.testing.assert_array_equal(compiled(x, weight).asnumpy(), layer.apply_rows(x, weight, same=same).asnumpy())


@pytest.mark.parametrize("channels, outputs, taps, dilation", [(3, 3, 3, 3), (32, 32, 7, 1), (16, 5, 11, 5)])
def test_a_convolution_fused_with_its_activation_is_the_two_kernels_in_turn(channels, outputs, taps, dilation):
    """ActivatedConvolution, its biased and residual forms: the activation (of x, x + bias, x + y +
    bias) kept inside the kernel, then the convolution, equal to AntiAliasedSnake's (or its
    variant's) output through SameConvolution, to the bit; lengths around the convolution's block
    widths, the real samples fewer than the row's and all of it; 2 rows a batch."""
    k = snake_kernels(vocoder_library())
    weight = Tensor(rng.standard_normal((outputs, channels, 1, taps)).astype(np.float32))
    alpha, beta, bias = (Tensor(rng.uniform(-1, 1, channels).astype(np.float32)) for _ in range(3))
    taps_filter, d = AntiAliasedActivation(channels, ms.float32).taps, Tensor(np.array([dilation], np.int32))
    for n in (5, 127, 128, 129, 300, 513):
        for real in sorted({n, max(1, n - 7)}):
            x, y = (Tensor(rng.standard_normal((2, channels, 1, n)).astype(np.float32)) for _ in range(2))
            valid = Tensor(np.array(real, np.int32))
            want = k.same_convolution(k.activation(x, valid, alpha, beta, taps_filter), weight, d).asnumpy()
            got = k.activated_convolution(x, valid, alpha, beta, taps_filter, weight, d).asnumpy()
            np.testing.assert_array_equal(got, want)
            want = k.same_convolution(k.biased(x, bias, valid, alpha, beta, taps_filter), weight, d).asnumpy()
            got = k.biased_activated_convolution(x, bias, valid, alpha, beta, taps_filter, weight, d).asnumpy()
            np.testing.assert_array_equal(got, want)
            total, activated = k.residual(x, y, bias, valid, alpha, beta, taps_filter)
            got_total, got = k.residual_activated_convolution(x, y, bias, valid, alpha, beta, taps_filter, weight, d)
            np.testing.assert_array_equal(got_total.asnumpy(), total.asnumpy())
            np.testing.assert_array_equal(got.asnumpy(), k.same_convolution(activated, weight, d).asnumpy())


@pytest.mark.parametrize("channels, kernel_size, dilations", [(4, 3, (1, 3, 5)), (16, 7, (1, 3)), (2, 11, (1,))])
def test_an_amp_block_as_one_kernel_is_its_fused_kernels_in_turn(channels, kernel_size, dilations):
    """AMPBlock's one-call kernel against its per-unit fused kernels (`_fused_rows`), to the bit:
    the released checkpoint's kernel sizes and dilations and fewer; lengths around the
    convolution's block widths, the real samples fewer than the row's or all of it, one count for
    the rows or one each; op by op and inside a compiled graph."""
    block = AMPBlock(channels, kernel_size, dilations, ms.float32, vocoder_library())
    assert block.whole_block is not None
    weights = []
    for i in range(len(dilations)):
        for conv in (block.convs1[i], block.convs2[i]):
            weights += [Tensor(rng.uniform(-1, 1, channels).astype(np.float32)) for _ in range(2)]  # alpha, beta
            weights += [Tensor((rng.standard_normal((channels, channels, 1, kernel_size)) * 0.3).astype(np.float32)),
                        Tensor(rng.standard_normal(channels).astype(np.float32))]
    weights = tuple(weights)
    whole = block.whole_block

    def per_unit(x, valid):
        block.whole_block = None
        try:
            return block.apply_rows(x, valid, weights).asnumpy()
        finally:
            block.whole_block = whole

    for n in (5, 127, 128, 129, 300):
        x = Tensor(rng.standard_normal((2, channels, 1, n)).astype(np.float32))
        for real in sorted({n, max(1, n - 7)}):
            for valid in (np.array(real, np.int32), np.array([real, max(1, real - 3)], np.int32)):
                got = block.apply_rows(x, Tensor(valid), weights).asnumpy()
                np.testing.assert_array_equal(got, per_unit(x, Tensor(valid)), err_msg=f"n {n}, valid {valid}")

    @ms.jit
    def compiled(x, valid, weights):
        return block.apply_rows(x, valid, weights)

    x = Tensor(rng.standard_normal((2, channels, 1, 200)).astype(np.float32))
    valid = Tensor(np.array([200, 150], np.int32))
    np.testing.assert_array_equal(compiled(x, valid, weights).asnumpy(), per_unit(x, valid))


def test_the_amp_block_kernel_refuses_a_convolution_that_changes_the_channels():
    block = AMPBlock(4, 3, (1, 3), ms.float32, vocoder_library())
    x = Tensor(rng.standard_normal((1, 4, 1, 20)).astype(np.float32))
    valid = Tensor(np.array(20, np.int32))
    fitting = [Tensor(rng.uniform(-1, 1, shape).astype(np.float32)) for _ in range(2 * 2)  # 2 units, 2 halves
               for shape in ((4,), (4,), (4, 4, 1, 3), (4,))]
    assert block.apply_rows(x, valid, tuple(fitting)).shape == x.shape
    for changed in (2, 6, 14):  # the first unit's first or second convolution, the last unit's second
        weights = list(fitting)
        weights[changed] = Tensor(np.zeros((5, 4, 1, 3), np.float32))
        with pytest.raises(RuntimeError, match="AMPBlock"):
            block.apply_rows(x, valid, tuple(weights)).asnumpy()


def test_only_narrow_same_padded_convolutions_run_natively():
    kernels = snake_kernels(vocoder_library())
    assert narrow_convolution(kernels, NATIVE_CONVOLUTION_CHANNELS) is kernels.same_convolution
    assert narrow_convolution(kernels, NATIVE_CONVOLUTION_CHANNELS + 1) is None
    assert narrow_convolution(None, 2) is None
    x, weight = Tensor(np.ones((1, 2, 1, 9), np.float32)), Tensor(np.ones((2, 2, 1, 3), np.float32))
    with pytest.raises(ValueError, match="padding"):
        Conv1d(2, 2, 3, 1, 0, 1).apply_rows(x, weight, same=kernels.same_convolution)


def test_bias_and_residual_variants_are_the_activation_of_their_sums(activations):
    """BiasedAntiAliasedSnake(x, b): the activation of x + b; ResidualAntiAliasedSnake(x, y, b):
    (x + y + b, its activation); BiasedResidual(x, y, b): x + y + b; b per channel. The sums in the
    same float32 order as numpy's (x + y) + b, so every output equals the plain kernel's exactly
    (which the tests above hold to the ops and the reference), past `valid` too, in both layouts."""
    native, _, alpha, beta = activations
    # each kernel by itself: a compiled graph cannot read a named tuple's fields
    _, biased, residual, biased_residual = snake_kernels(vocoder_library())[:4]
    taps = native.taps
    for n, valid in [(6, 5), (9, 5), (40, 40), (241, 238)]:
        x, y = ((rng.standard_normal((2, CHANNELS, n)) * 2).astype(np.float32) for _ in range(2))
        x[..., valid:] = 50  # padding: read by no activation, carried by the sums
        bias = rng.standard_normal(CHANNELS).astype(np.float32)
        total = x + y + bias[:, None]
        plain = native.apply(Tensor(total), Tensor(np.int32(valid)), alpha, beta).asnumpy()
        for layout in ((2, CHANNELS, n), (2, CHANNELS, 1, n)):
            def run(x, y, bias, valid):
                return (biased(x + y, bias, valid, alpha, beta, taps), *residual(x, y, bias, valid, alpha, beta, taps),
                        biased_residual(x, y, bias))

            for call in (run, ms.jit(run)):
                got = [out.asnumpy().reshape(total.shape) for out in call(
                    Tensor(x.reshape(layout)), Tensor(y.reshape(layout)), Tensor(bias), Tensor(np.int32(valid)))]
                for out, want in zip(got, (plain, total, plain, total)):
                    np.testing.assert_array_equal(out, want, err_msg=f"n {n}, valid {valid}, layout {layout}")


@pytest.fixture(scope="module")
def attention():
    library = native_kernels.library(ATTENTION_SOURCE)
    assert library is not None, "this machine builds the native kernel (CI installs g++)"
    return attention_kernel(library)


def rotary_inputs(rows, length, heads, dim):
    """Projected q, k, v (rows, length, heads * dim), their biases and the rotary tables of `length`
    frames (the first head rotated, at frequencies up to those of frames far into a long answer)."""
    q, k, v = (Tensor(rng.standard_normal((rows, length, heads * dim)).astype(np.float32)) for _ in range(3))
    biases = tuple(Tensor(rng.standard_normal(heads * dim).astype(np.float32)) for _ in range(3))
    angles = np.repeat(np.arange(length, dtype=np.float32)[:, None] * rng.uniform(0, 3, dim // 2), 2, -1)
    cos, sin = rotation_tables(np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), heads)
    return q, k, v, biases, Tensor(cos), Tensor(sin)


@pytest.mark.parametrize("back, ahead", [(0, 0), (1, 0), (0, 1), (2, 1)])
def test_window_attention_at_every_frame_count_near_the_block_boundaries(attention, back, ahead):
    heads, dim, block = 2, 8, 24
    for frames in list(range(1, 4)) + [n for edge in (24, 48, 72) for n in range(edge - 2, edge + 3)]:
        for length in sorted({frames, -(-frames // block) * block + block}):  # as solved, and padded
            # one count for all rows, and one per row (windows of several answers solved together)
            for counts in (frames, [frames, max(1, frames - 5), frames]):
                rows = 1 if isinstance(counts, int) else len(counts)
                inputs = rotary_inputs(rows, length, heads, dim)
                window = block_window(counts, block, back, ahead, length)
                want = rotary_window_attention(*inputs, window, heads, dim).asnumpy()
                got = rotary_window_attention(*inputs, window, heads, dim, attention).asnumpy()
                assert got.shape == want.shape == (rows, length, heads * dim)
                assert max_abs_diff(got, want) <= 1e-5, (frames, length, counts)
                # given q, k, v as (rows x frames, H * D) rows (the whole DiT's graph), the same rows
                flat = [x.reshape(-1, x.shape[-1]) for x in inputs[:3]] + list(inputs[3:])
                as_rows = rotary_window_attention(*flat, window, heads, dim, attention).asnumpy()
                np.testing.assert_array_equal(as_rows, got.reshape(-1, heads * dim))


def test_a_masked_keys_value_never_reaches_the_output(attention):
    """A masked key's softmax weight is exactly 0 (as std::exp's underflow gives it): the frames
    past each row's count hold values of 1e30, and every valid frame's output is what it is with
    those values 0, to the bit (a weight of e^-87 / sum, a denormal, moved it by ~1e-8, and each
    product with a denormal costs ~100x: a prefill over a mostly empty cache ran 2.4x slower)."""
    heads, dim, counts, length = 2, 8, [30, 25], 48
    q, k, v, *rest = rotary_inputs(len(counts), length, heads, dim)
    window = block_window(counts, 24, 1, 1, length)
    padded = v.asnumpy().copy()
    for row, count in enumerate(counts):
        padded[row, count:] = 1e30
    zeroed = np.where(padded == 1e30, 0, padded).astype(np.float32)
    loud, quiet = (rotary_window_attention(q, k, Tensor(values), *rest, window, heads, dim, attention).asnumpy()
                   for values in (padded, zeroed))
    for row, count in enumerate(counts):
        np.testing.assert_array_equal(loud[row, :count], quiet[row, :count])
        assert np.abs(quiet[row, :count]).max() < 100  # (the values themselves are of order 1)


def test_window_attention_inside_a_compiled_graph(attention):
    inputs = rotary_inputs(2, 100, 16, 64)  # the released DiT's heads and head size
    window = block_window([100, 61], 24, 2, 1, 100)

    @ms.jit
    def compiled(q, k, v, biases, cos, sin, keys, valid):
        return rotary_window_attention(q, k, v, biases, cos, sin, (keys, valid), 16, 64, attention)

    got = compiled(*inputs, *window).asnumpy()
    assert max_abs_diff(got, rotary_window_attention(*inputs, window, 16, 64).asnumpy()) <= 1e-5


@pytest.fixture(scope="module")
def dit_kernels():
    kernels = DiTKernels.build(ms.float32)
    assert None not in kernels and None not in kernels.libraries, "this machine builds the native kernels"
    return kernels


@pytest.mark.parametrize("rows, shared", [(1, False), (2, True), (4, False)])
def test_modulated_norm_and_gated_residual_equal_the_ops(dit_kernels, rows, shared):
    """Rows of a batch with their own modulation, or the two halves of a guided row sharing one;
    frame counts 1 to past a block, the tiny DiT's width and the released one's; the kernels given
    the frames as (rows x frames, D) rows (the whole DiT's graph) give the same rows."""
    for frames in (1, 7, 62):
        for dim in (32, 1024):
            x = Tensor((rng.standard_normal((rows, frames, dim)) * 3 + rng.uniform(-50, 50)).astype(np.float32))
            y = Tensor(rng.standard_normal((rows, frames, dim)).astype(np.float32))
            scale, shift, gate = (Tensor(rng.standard_normal((1 if shared else rows, dim)).astype(np.float32))
                                  for _ in range(3))
            bias = Tensor(rng.standard_normal(dim).astype(np.float32))
            x_rows, y_rows = x.reshape(-1, dim), y.reshape(-1, dim)
            want = modulated_norm(x, scale, shift).asnumpy()
            got = modulated_norm(x, scale, shift, dit_kernels.modulated_norm).asnumpy()
            assert got.shape == want.shape and max_abs_diff(got, want) <= 1e-5 * max(1, np.abs(want).max())
            as_rows = modulated_norm(x_rows, scale, shift, dit_kernels.modulated_norm).asnumpy()
            np.testing.assert_array_equal(as_rows, got.reshape(-1, dim))
            want = gated_residual(x, gate, y, bias).asnumpy()
            got = gated_residual(x, gate, y, bias, dit_kernels.gated_residual).asnumpy()
            assert got.shape == want.shape and max_abs_diff(got, want) <= 1e-5 * max(1, np.abs(want).max())
            as_rows = gated_residual(x_rows, gate, y_rows, bias, dit_kernels.gated_residual).asnumpy()
            np.testing.assert_array_equal(as_rows, got.reshape(-1, dim))


def test_gelu_tanh_equals_the_ops(dit_kernels):
    """Over the range where the sigmoid saturates both ways, zero and the MLP's usual values."""
    x = np.concatenate([rng.uniform(-60, 60, 2000), rng.standard_normal(2000) * 3, [0.0, -0.0, 1e-30, -1e-30]])
    x = Tensor(x.astype(np.float32).reshape(2, 2, -1))
    bias = Tensor(rng.standard_normal(x.shape[-1]).astype(np.float32))
    want, got = gelu_tanh(x, bias).asnumpy(), gelu_tanh(x, bias, dit_kernels.gelu_tanh).asnumpy()
    assert got.shape == want.shape and np.isfinite(got).all()
    assert max_abs_diff(got, want) <= 1e-5 * max(1, np.abs(want).max())


def test_modulated_norm_and_gated_residual_inside_a_compiled_graph(dit_kernels):
    x, y = (Tensor(rng.standard_normal((2, 100, 64)).astype(np.float32)) for _ in range(2))
    scale, shift, gate = (Tensor(rng.standard_normal((2, 64)).astype(np.float32)) for _ in range(3))
    bias = Tensor(rng.standard_normal(64).astype(np.float32))

    @ms.jit
    def compiled(x, y, scale, shift, gate, bias):
        h = modulated_norm(x, scale, shift, dit_kernels.modulated_norm)
        return gated_residual(x, gate, gelu_tanh(h * y, bias, dit_kernels.gelu_tanh), bias, dit_kernels.gated_residual)

    want = gated_residual(x, gate, gelu_tanh(modulated_norm(x, scale, shift) * y, bias), bias)
    assert max_abs_diff(compiled(x, y, scale, shift, gate, bias).asnumpy(), want.asnumpy()) <= 1e-5


def block_weights(dim, heads, head_dim, hidden):
    """A DiT block's 14 weights (dit_layer's order) at random, as a checkpoint's shapes."""
    inner = heads * head_dim
    shapes = [(6 * dim, dim), (6 * dim,), (inner, dim), (inner,), (inner, dim), (inner,), (inner, dim), (inner,),
              (dim, inner), (dim,), (hidden, dim), (hidden,), (dim, hidden), (dim,)]
    return tuple(Tensor((rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)) for shape in shapes)


@pytest.mark.parametrize("dim, heads, head_dim, hidden", [(32, 2, 16, 64), (1024, 16, 64, 2048)])
@pytest.mark.parametrize("back, ahead", [(1, 0), (0, 1)])
def test_a_dit_block_as_one_kernel_equals_its_steps_as_ops(dit_kernels, dim, heads, head_dim, hidden, back, ahead):
    """The tiny DiT's widths and the released one's; one guided row (its two halves share a time
    embedding, one frame count) and two answers' rows (each its own time and frame count); frame
    counts near the block boundaries, solved at their length or padded past a block; the frames as
    (rows, frames, D) or as (rows x frames, D) rows."""
    weights = block_weights(dim, heads, head_dim, hidden)
    element_wise = dit_kernels._replace(block=None)
    for frames in ((1, 23, 24, 25, 48, 49) if dim == 32 else (25,)):
        for length in sorted({frames, -(-frames // 24) * 24 + 24}):
            for counts, times in ((frames, 1), ([frames, max(1, frames - 7), frames, max(1, frames - 7)], 4)):
                rows = 2 if isinstance(counts, int) else len(counts)
                x = Tensor((rng.standard_normal((rows, length, dim)) * 2).astype(np.float32))
                t_emb = Tensor(rng.standard_normal((times, dim)).astype(np.float32))
                _, _, _, _, cos, sin = rotary_inputs(1, length, heads, head_dim)
                window = block_window(counts, 24, back, ahead, length)
                want = dit_layer(x, t_emb, cos, sin, window, weights, heads, head_dim).asnumpy()
                tolerance = 1e-5 * max(1, np.abs(want).max())
                for kernels in (dit_kernels, element_wise):
                    got = dit_layer(x, t_emb, cos, sin, window, weights, heads, head_dim, kernels).asnumpy()
                    assert got.shape == want.shape and max_abs_diff(got, want) <= tolerance, (frames, length, counts)
                as_rows = dit_layer(x.reshape(-1, dim), t_emb, cos, sin, window, weights, heads, head_dim, dit_kernels)
                np.testing.assert_array_equal(as_rows.asnumpy(), dit_layer(
                    x, t_emb, cos, sin, window, weights, heads, head_dim, dit_kernels).asnumpy().reshape(-1, dim))


def test_the_dit_block_kernel_refuses_weights_of_other_shapes(dit_kernels):
    """Each weight's shape is checked against x's and the rotary table's before any is read (a k
    projection of other widths than q's would be read past its end)."""
    heads, head_dim, dim = 2, 16, 32
    x = Tensor(rng.standard_normal((48, dim)).astype(np.float32))
    t_emb = Tensor(rng.standard_normal((1, dim)).astype(np.float32))
    _, _, _, _, cos, sin = rotary_inputs(1, 48, heads, head_dim)
    window = block_window(48, 24, 1, 1, 48)
    for at, shape in ((4, (heads * head_dim - 8, dim)), (5, (heads * head_dim + 1,)), (12, (64, dim + 1))):
        weights = list(block_weights(dim, heads, head_dim, 64))
        weights[at] = Tensor(np.zeros(shape, np.float32))
        with pytest.raises(RuntimeError, match="DiTBlock"):
            dit_layer(x, t_emb, cos, sin, window, tuple(weights), heads, head_dim, dit_kernels).asnumpy()


def test_a_dit_block_as_one_kernel_inside_a_compiled_graph(dit_kernels):
    heads, head_dim, dim = 2, 16, 32
    weights = block_weights(dim, heads, head_dim, 64)
    x = Tensor(rng.standard_normal((2 * 48, dim)).astype(np.float32))
    t_emb = Tensor(rng.standard_normal((1, dim)).astype(np.float32))
    _, _, _, _, cos, sin = rotary_inputs(1, 48, heads, head_dim)
    window = block_window(40, 24, 1, 1, 48)

    @ms.jit
    def compiled(x, t_emb, cos, sin, keys, valid, weights):
        return dit_layer(x, t_emb, cos, sin, (keys, valid), weights, heads, head_dim, dit_kernels)

    want = dit_layer(x.reshape(2, 48, dim), t_emb, cos, sin, window, weights, heads, head_dim).asnumpy()
    got = compiled(x, t_emb, cos, sin, *window, weights).asnumpy()
    assert max_abs_diff(got, want.reshape(-1, dim)) <= 1e-5 * max(1, np.abs(want).max())
