"""The vision encoder's native attention kernel (kernels/segment_attention.cc) against float64
numpy and against the ops it replaces (Ascend's path: rotate, then segmented_attention over a
segment_layout): segment lengths on each side of the kernel's query chunks (QUERY_ROWS), empty
segments, rows past the segments, scores far apart (its exponential's range), heads and head sizes
of the tiny and the 7B encoders, one thread and two; op by op and compiled; inputs it must refuse."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindone_ext.models.qwen2_5_omni.vision_encoder import rotate
from mindone_ext.nn.attention import segment_layout, segmented_attention
from mindone_ext.nn.device import on_ascend
from mindone_ext.nn.encoder_kernels import EncoderKernels
from tests.conftest import max_abs_diff

pytestmark = pytest.mark.skipif(on_ascend(), reason="the native kernel is the CPU target's; Ascend runs the ops")
QUERY_ROWS = 256  # segment_attention.cc's query chunk
rng = np.random.default_rng(8)


@pytest.fixture(scope="module")
def kernel():
    built = EncoderKernels.build(ms.float32).segment_attention
    assert built is not None, "this machine builds the native kernel (CI installs g++; MindSpore ships oneDNN)"
    return built


def inputs(tokens, heads, dim, spread=1.0):
    q, k, v = (rng.standard_normal((tokens, heads * dim)).astype(np.float32) for _ in range(3))
    angles = rng.uniform(-6, 6, (tokens, 1, dim)).astype(np.float32)
    return q * spread, k, v, np.cos(angles), np.sin(angles)


def expected(q, k, v, cos, sin, lengths, scale):
    """float64: q and k rotated (rotate_half form), softmax attention within each segment."""
    tokens, dim = q.shape[0], cos.shape[-1]
    heads = q.shape[1] // dim

    def rotated(x):
        x = x.reshape(tokens, heads, dim).astype(np.float64)
        return x * cos + np.concatenate([-x[..., dim // 2:], x[..., :dim // 2]], -1) * sin

    q, k, v = rotated(q), rotated(k), v.reshape(tokens, heads, dim).astype(np.float64)
    out, start = np.zeros((tokens, heads, dim)), 0
    for length in lengths:
        part = slice(start, start + length)
        scores = np.einsum("qhd,khd->hqk", q[part], k[part]) * scale
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[part] = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v[part])
        start += length
    return out.reshape(tokens, heads * dim)


def run(kernel, q, k, v, cos, sin, lengths, scale, compiled=False):
    args = [Tensor(a) for a in (q, k, v, cos, sin)] + [Tensor(np.asarray(lengths, np.int32)),
                                                       Tensor(np.array([scale], np.float32))]
    if not compiled:
        return kernel(*args).asnumpy()

    def graph(*a):
        return kernel(*a)

    return ms.jit(graph)(*args).asnumpy()


def through_ops(q, k, v, cos, sin, lengths, scale):
    """What the vision blocks run without the kernel (and on Ascend, in float32)."""
    tokens, dim = q.shape[0], cos.shape[-1]
    q, k, v = (Tensor(x.reshape(tokens, -1, dim)) for x in (q, k, v))
    cos, sin = Tensor(cos), Tensor(sin)
    return segmented_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, segment_layout(lengths), scale).asnumpy()


@pytest.mark.parametrize("length", [1, 2, 17, QUERY_ROWS - 1, QUERY_ROWS, QUERY_ROWS + 1, 2 * QUERY_ROWS - 1,
                                    2 * QUERY_ROWS, 2 * QUERY_ROWS + 1])
def test_segment_lengths_around_the_query_chunks(kernel, length):
    """One segment between two others, its length on each side of whole chunks of queries."""
    lengths = [3, length, 5]
    q, k, v, cos, sin = inputs(sum(lengths), 2, 8)
    got = run(kernel, q, k, v, cos, sin, lengths, 0.35)
    assert max_abs_diff(got, expected(q, k, v, cos, sin, lengths, 0.35)) <= 2e-6
    assert max_abs_diff(got, through_ops(q, k, v, cos, sin, lengths, 0.35)) <= 2e-6


@pytest.mark.parametrize("heads, dim, lengths", [(2, 16, [64] * 7 + [40]),  # the tiny encoder's windows
                                                 (16, 80, [64] * 4 + [32, 48]),  # the 7B's (a one-thread call)
                                                 (16, 80, [300])],  # a frame of the 7B (two threads)
                         ids=["tiny-windows", "7b-windows", "7b-frame"])
def test_the_encoders_heads_and_sizes(kernel, heads, dim, lengths):
    q, k, v, cos, sin = inputs(sum(lengths), heads, dim)
    scale = dim ** -0.5
    got = run(kernel, q, k, v, cos, sin, lengths, scale)
    np.testing.assert_array_equal(run(kernel, q, k, v, cos, sin, lengths, scale, compiled=True), got)
    assert max_abs_diff(got, expected(q, k, v, cos, sin, lengths, scale)) <= 2e-6
    assert max_abs_diff(got, through_ops(q, k, v, cos, sin, lengths, scale)) <= 2e-6


def test_empty_segments_and_rows_past_the_segments(kernel):
    """Segments of length 0 (the count padded to a power of two) attend nothing; rows past the
    segments (patches padded to a graph's width) come out zero, whatever was in their inputs."""
    lengths, tokens = [0, 9, 0, 30, 0, 0, 0, 0], 48
    q, k, v, cos, sin = inputs(tokens, 2, 8)
    got = run(kernel, q, k, v, cos, sin, lengths, 0.35)
    real = sum(lengths)
    want = expected(q[:real], k[:real], v[:real], cos[:real], sin[:real], [9, 30], 0.35)
    assert max_abs_diff(got[:real], want) <= 2e-6
    np.testing.assert_array_equal(got[real:], 0)


def test_scores_far_apart(kernel):
    """Shifted scores down to about -2000 (the exponential clamps at -87, e^-87 against a sum of at
    least 1) and rows whose scores are all close. Scores of ~1000 hold ~1e-4 of float32 rounding,
    which moves their exponentials by as much: held to what the ops give, and both to float64."""
    lengths = [200, 40]
    q, k, v, cos, sin = inputs(sum(lengths), 2, 16, spread=40.0)
    q[200:] *= 1e-3
    got = run(kernel, q, k, v, cos, sin, lengths, 0.25)
    want, ops = expected(q, k, v, cos, sin, lengths, 0.25), through_ops(q, k, v, cos, sin, lengths, 0.25)
    assert max_abs_diff(got, want) <= 1e-4 and max_abs_diff(got, want) <= 2 * max_abs_diff(ops, want)
    assert max_abs_diff(got[200:], want[200:]) <= 2e-6


@pytest.mark.parametrize("problem", ["segments past the rows", "negative length", "odd head size",
                                     "float16", "int64 lengths"])
def test_inputs_it_refuses(kernel, problem):
    q, k, v, cos, sin = inputs(20, 2, 8)
    lengths, dtype, length_type = [12, 8], np.float32, np.int32
    if problem == "segments past the rows":
        lengths = [12, 9]
    elif problem == "negative length":
        lengths = [25, -5]
    elif problem == "odd head size":
        q, k, v, cos, sin = inputs(20, 2, 7)
    elif problem == "float16":
        dtype = np.float16
    else:
        length_type = np.int64
    args = [Tensor(a.astype(dtype)) for a in (q, k, v, cos, sin)] + [Tensor(np.asarray(lengths, length_type)),
                                                                     Tensor(np.array([0.3], dtype))]
    with pytest.raises(Exception):
        kernel(*args).asnumpy()
