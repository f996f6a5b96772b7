"""The encoders' native attention kernels (kernels/segment_attention.cc: the vision blocks' with q
and k rotated, the audio layers' without) against float64 numpy and against the ops they replace
(Ascend's path: rotate, then segmented_attention over a segment_layout): segment lengths on each
side of the kernel's query chunks (QUERY_ROWS), empty segments, rows between and past the segments,
scores far apart (its exponential's range), heads and head sizes of the tiny and the 7B encoders,
one thread and two; op by op and compiled; inputs they must refuse."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindone_ext.models.qwen2_5_omni.vision_encoder import rotate
from mindone_ext.nn.attention import segment_layout, segmented_attention
from mindone_ext.nn.device import on_ascend
from mindone_ext.nn.encoder_kernels import EncoderKernels, segment_table
from tests.conftest import max_abs_diff

pytestmark = pytest.mark.skipif(on_ascend(), reason="the native kernel is the CPU target's; Ascend runs the ops")
QUERY_ROWS = 256  # segment_attention.cc's query chunk


@pytest.fixture(scope="module")
def kernels():
    built = EncoderKernels.build(ms.float32)
    assert built.rotary_attention is not None and built.segment_attention is not None, \
        "this machine builds the native kernels (CI installs g++; MindSpore ships oneDNN)"
    return built


def inputs(tokens, heads, dim, spread=1.0):
    # drawn from the shape, not from a module-wide stream: the same inputs whichever tests ran before
    rng = np.random.default_rng([tokens, heads, dim])
    q, k, v = (rng.standard_normal((tokens, heads, dim)).astype(np.float32) for _ in range(3))
    angles = rng.uniform(-6, 6, (tokens, 1, dim)).astype(np.float32)
    return q * spread, k, v, np.cos(angles), np.sin(angles)


def expected(q, k, v, cos, sin, segments, scale):
    """float64: q and k rotated (rotate_half form; cos None: not rotated), softmax attention within
    each (first row, length) of `segments`, zeros elsewhere."""
    dim = q.shape[-1]

    def rotated(x):
        x = x.astype(np.float64)
        return x if cos is None else x * cos + np.concatenate([-x[..., dim // 2:], x[..., :dim // 2]], -1) * sin

    q, k, v = rotated(q), rotated(k), v.astype(np.float64)
    out = np.zeros(q.shape)
    for start, length in segments:
        if length == 0:
            continue
        part = slice(start, start + length)
        scores = np.einsum("qhd,khd->hqk", q[part], k[part]) * scale
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[part] = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v[part])
    return out


def consecutive(lengths):
    return [(int(start), int(length)) for start, length in zip(np.cumsum([0] + lengths[:-1]), lengths)]


def run(kernels, q, k, v, cos, sin, segments, scale, compiled=False):
    table = Tensor(np.asarray(segments, np.int32).reshape(-1, 2))
    args = [Tensor(a) for a in (q, k, v)] + ([] if cos is None else [Tensor(cos), Tensor(sin)])
    args += [table, Tensor(np.array([scale], np.float32))]
    kernel = kernels.segment_attention if cos is None else kernels.rotary_attention
    if not compiled:
        return kernel(*args).asnumpy()

    def graph(*a):
        return kernel(*a)

    return ms.jit(graph)(*args).asnumpy()


def through_ops(q, k, v, cos, sin, lengths, scale):
    """What the vision blocks run without the kernel (and on Ascend, in float32), segments consecutive."""
    q, k, v = (Tensor(x) for x in (q, k, v))
    if cos is not None:
        cos, sin = Tensor(cos), Tensor(sin)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    out = segmented_attention(q, k, v, segment_layout(lengths), scale).asnumpy()
    return out.reshape(out.shape[0], -1, q.shape[-1])


ROTARY = pytest.mark.parametrize("rotary", [True, False], ids=["rotary", "plain"])


def maybe_rotated(rotary, q, k, v, cos, sin):
    return (q, k, v, cos, sin) if rotary else (q, k, v, None, None)


@ROTARY
@pytest.mark.parametrize("length", [1, 2, 17, QUERY_ROWS - 1, QUERY_ROWS, QUERY_ROWS + 1, 2 * QUERY_ROWS - 1,
                                    2 * QUERY_ROWS, 2 * QUERY_ROWS + 1])
def test_segment_lengths_around_the_query_chunks(kernels, rotary, length):
    """One segment between two others, its length on each side of whole chunks of queries."""
    lengths = [3, length, 5]
    args = maybe_rotated(rotary, *inputs(sum(lengths), 2, 8))
    got = run(kernels, *args, consecutive(lengths), 0.35)
    assert max_abs_diff(got, expected(*args, consecutive(lengths), 0.35)) <= 2e-6
    assert max_abs_diff(got, through_ops(*args, lengths, 0.35)) <= 2e-6


@ROTARY
@pytest.mark.parametrize("heads, dim, lengths", [(2, 16, [64] * 7 + [40]),  # the tiny vision encoder's windows
                                                 (16, 80, [64] * 4 + [32, 48]),  # the 7B's (a one-thread call)
                                                 (16, 80, [300]),  # a frame of the 7B's (two threads)
                                                 (20, 64, [100, 100, 37])],  # the 7B audio encoder's windows
                         ids=["tiny-windows", "7b-windows", "7b-frame", "7b-audio"])
def test_the_encoders_heads_and_sizes(kernels, rotary, heads, dim, lengths):
    args = maybe_rotated(rotary, *inputs(sum(lengths), heads, dim))
    scale = dim ** -0.5
    got = run(kernels, *args, consecutive(lengths), scale)
    np.testing.assert_array_equal(run(kernels, *args, consecutive(lengths), scale, compiled=True), got)
    assert max_abs_diff(got, expected(*args, consecutive(lengths), scale)) <= 2e-6
    assert max_abs_diff(got, through_ops(*args, lengths, scale)) <= 2e-6


@ROTARY
def test_empty_segments_and_rows_in_none(kernels, rotary):
    """Segments of length 0 (a count padded to a power of two) attend nothing; rows between
    segments (an audio window's padding) and past them (patches padded to a graph's width) come out
    zero, whatever was in their inputs. The table as the encoders make it."""
    segments = [(0, 0), (0, 9), (12, 30), (42, 0), (50, 5), (64, 0), (64, 0), (64, 0)]
    args = maybe_rotated(rotary, *inputs(70, 2, 8))
    table = segment_table([n for _, n in segments], starts=[s for s, _ in segments], count=8).asnumpy()
    np.testing.assert_array_equal(table, segments)
    got = run(kernels, *args, segments, 0.35)
    assert max_abs_diff(got, expected(*args, segments, 0.35)) <= 2e-6
    for rows in (slice(9, 12), slice(42, 50), slice(55, 70)):
        np.testing.assert_array_equal(got[rows], 0)


def test_segment_table_pads_the_count_with_empty_segments_at_the_end():
    np.testing.assert_array_equal(segment_table([4, 0, 6], count=4).asnumpy(), [[0, 4], [4, 0], [4, 6], [10, 0]])


@ROTARY
def test_scores_far_apart(kernels, rotary):
    """Shifted scores down to about -2000 (the exponential clamps at -87, e^-87 against a sum of at
    least 1) and rows whose scores are all close. Scores of ~1000 hold ~1e-4 of float32 rounding,
    which moves their exponentials by as much: held to what the ops give, and both to float64."""
    lengths = [200, 40]
    q, k, v, cos, sin = maybe_rotated(rotary, *inputs(sum(lengths), 2, 16, spread=40.0))
    q[200:] *= 1e-3
    got = run(kernels, q, k, v, cos, sin, consecutive(lengths), 0.25)
    want = expected(q, k, v, cos, sin, consecutive(lengths), 0.25)
    ops = through_ops(q, k, v, cos, sin, lengths, 0.25)
    assert max_abs_diff(got, want) <= 1e-4 and max_abs_diff(got, want) <= 2 * max_abs_diff(ops, want)
    assert max_abs_diff(got[200:], want[200:]) <= 2e-6


@pytest.mark.parametrize("problem", ["segment past the rows", "segments out of order", "negative length",
                                     "odd head size", "float16", "int64 segments", "lengths alone"])
def test_inputs_it_refuses(kernels, problem):
    q, k, v, cos, sin = inputs(20, 2, 8)
    segments, dtype, table_type = [(0, 12), (12, 8)], np.float32, np.int32
    if problem == "segment past the rows":
        segments = [(0, 12), (12, 9)]
    elif problem == "segments out of order":
        segments = [(8, 12), (0, 8)]
    elif problem == "negative length":
        segments = [(0, 25), (25, -5)]
    elif problem == "odd head size":
        q, k, v, cos, sin = inputs(20, 2, 7)
    elif problem == "float16":
        dtype = np.float16
    elif problem == "int64 segments":
        table_type = np.int64
    table = np.asarray(segments, table_type)
    if problem == "lengths alone":
        table = table[:, 1]
    args = [Tensor(a.astype(dtype)) for a in (q, k, v, cos, sin)] + [Tensor(table), Tensor(np.array([0.3], dtype))]
    with pytest.raises(Exception):
        kernels.rotary_attention(*args).asnumpy()
