"""The compiled vocoder against BigVGAN op by op (itself at parity with the reference in
test_speech.py): every length around the windows' boundaries and the short graph's width, windows
of a long mel, each through the narrowest graph that holds it; and the widths its memory budget
allows. A small BigVGAN with random weights keeps
the graph's compilation short."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from mindspore import Tensor

from mindone_ext.models.qwen2_5_omni.bigvgan import Qwen2_5OmniToken2WavBigVGANModel, vocoder_library
from mindone_ext.models.qwen2_5_omni.vocoder import (CONTEXT, GRAPH_BYTES, MAX_SHORT_ROWS, SHORT_WIDTH, Vocoder,
                                                    graph_width, kept_bytes_per_frame, short_rows)
from tests.conftest import SHIPPED_CHECKPOINT, max_abs_diff

CONFIG = SimpleNamespace(mel_dim=8, upsample_initial_channel=16, upsample_rates=[3, 2], upsample_kernel_sizes=[7, 4],
                         resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]])
MEL = (np.random.default_rng(1).standard_normal((160, CONFIG.mel_dim)) - 4).astype(np.float32)
WIDTH = 64


def random_bigvgan():
    model = Qwen2_5OmniToken2WavBigVGANModel(CONFIG)
    rng = np.random.default_rng(0)
    for _, p in model.parameters_and_names():
        p.set_data(Tensor((rng.standard_normal(p.shape) * 0.3).astype(np.float32)))
    return model


@pytest.fixture(scope="module")
def bigvgan():
    return random_bigvgan()


def recorded(vocoder):
    """`vocoder` with its graph calls recorded in `vocoder.ran`: (each row's frames, graph width)."""
    graph, vocoder.ran = vocoder._graph, []

    def recording(mel, frames, weights):
        vocoder.ran.append((frames.asnumpy().tolist(), mel.shape[-1]))
        return graph(mel, frames, weights)

    vocoder._graph = recording
    return vocoder


@pytest.fixture(scope="module")
def compiled(bigvgan):
    return recorded(Vocoder(bigvgan, compiled=True, width=WIDTH))


def narrowest_graphs(vocoder):
    """Whether every window so far ran through the narrowest graph holding it; then forget them."""
    ran, vocoder.ran = vocoder.ran, []
    return bool(ran) and all(width == (SHORT_WIDTH if max(frames) <= SHORT_WIDTH else WIDTH) for frames, width in ran)


def op_by_op(bigvgan, mel):
    return bigvgan(Tensor(mel.T[None])).asnumpy().reshape(-1)


def test_every_length_around_the_window_boundaries(bigvgan, compiled):
    step = WIDTH - 2 * CONTEXT  # new frames per window between the first and the last
    # one window holds the mel up to WIDTH frames; each further one adds `step` (the first and the
    # last keep frames up to the mel's edges)
    boundaries = [SHORT_WIDTH] + [WIDTH + k * step for k in range(3)]
    for frames in list(range(1, 4)) + [n for b in boundaries for n in range(b - 2, b + 3)]:
        want = op_by_op(bigvgan, MEL[:frames])
        got = compiled(MEL[:frames])
        assert got.dtype == np.float32 and got.shape == want.shape == (frames * 6,)
        assert max_abs_diff(got, want) <= 1e-4, frames
        windows = compiled._windows(MEL[:frames], 0, frames, CONTEXT)
        assert len(windows) == 1 + max(0, -(-(frames - WIDTH) // step)), frames
        assert all(last - first <= WIDTH for first, last, _, _ in windows)
        assert narrowest_graphs(compiled), frames
    assert compiled.widths == (SHORT_WIDTH, WIDTH)


def test_a_long_mel_in_windows_equals_the_whole(bigvgan, compiled):
    for frames in (95, 96, 97, 160):  # windows of 32 new frames: the last full, one frame long, or several
        want = op_by_op(bigvgan, MEL[:frames])
        assert max_abs_diff(compiled.span(MEL[:frames], 0, frames, context=16), want) <= 1e-4, frames
    # a span in the middle: what the streamed answer asks for
    assert max_abs_diff(compiled.span(MEL, 40, 90, context=16), op_by_op(bigvgan, MEL)[40 * 6:90 * 6]) <= 1e-4
    assert narrowest_graphs(compiled)
    with pytest.raises(ValueError, match="context of 32 frames leaves nothing of a 64-frame window"):
        compiled.span(MEL, 0, 10, context=32)


@pytest.mark.parametrize("native", [True, False])
def test_the_graph_width_is_what_the_memory_budget_allows(monkeypatch, native):
    from mindone_ext.utils import native_kernels

    if native and vocoder_library() is None:
        pytest.skip("native kernels are not used here (the Ascend target)")
    if not native:
        monkeypatch.setenv(native_kernels.ENV, "off")
    released = SimpleNamespace(mel_dim=80, upsample_initial_channel=1536, resblock_kernel_sizes=[3, 7, 11],
                               resblock_dilation_sizes=[[1, 3, 5]] * 3, upsample_rates=[5, 3, 2, 2, 2, 2],
                               upsample_kernel_sizes=[11, 7, 4, 4, 4, 4])
    with open(os.path.join(SHIPPED_CHECKPOINT, "config.json")) as f:
        tiny = SimpleNamespace(**json.load(f)["token2wav_config"]["bigvgan_config"])
    # the released vocoder's graph would keep ~108 MB per frame as ops (7.0 GB measured at 64), ~25 MB
    # with native activations: op by op either way
    assert graph_width(Qwen2_5OmniToken2WavBigVGANModel(released)) is None
    assert not Vocoder(Qwen2_5OmniToken2WavBigVGANModel(released)).compiled
    tiny = Qwen2_5OmniToken2WavBigVGANModel(tiny)
    assert (tiny.native is not None) == native
    # ~6 MB per frame as ops: one short window a call, 128 + 48 frames in 1 GB; ~1.4 MB native: 4
    # short windows a call (graphs of 1, 2 and 4 rows: 336 frames) and the widest window
    width, rows = (256, 4) if native else (128, 1)
    assert (graph_width(tiny), short_rows(tiny)) == (width, rows)
    vocoder = Vocoder(tiny, compiled=True)
    assert (vocoder.widths, vocoder.rows) == ((SHORT_WIDTH, width), rows)
    assert (SHORT_WIDTH * (2 * rows - 1) + width) * kept_bytes_per_frame(tiny) <= GRAPH_BYTES
    assert SHORT_WIDTH * (4 * rows - 1) * kept_bytes_per_frame(tiny) > GRAPH_BYTES // 2  # twice the rows would not fit
    small = Qwen2_5OmniToken2WavBigVGANModel(CONFIG)
    assert (graph_width(small), short_rows(small)) == (256, MAX_SHORT_ROWS)  # the widest window, the most rows


def test_op_by_op_runs_the_span_in_one_call(bigvgan):
    plain = Vocoder(bigvgan, compiled=False)
    assert max_abs_diff(plain.span(MEL, 40, 90, context=40), op_by_op(bigvgan, MEL[:130])[40 * 6:90 * 6]) <= 1e-4
    assert not plain.compiled_shapes


def test_spans_of_several_answers_equal_each_alone(bigvgan, monkeypatch):
    plain = Vocoder(bigvgan, compiled=False)
    other = (np.random.default_rng(2).standard_normal((120, CONFIG.mel_dim)) - 4).astype(np.float32)
    requests = [(MEL, 40, 90, 24), (other, 30, 80, 24), (MEL, 0, 30, 24), (other, 96, 120, 24)]
    alone = [plain.span(*request) for request in requests]
    batches = record_batches(plain, monkeypatch)
    for got, want in zip(plain.spans(requests), alone):
        assert got.shape == want.shape and max_abs_diff(got, want) <= 1e-5
    # windows 16..114 and 6..104 are both 98 frames wide: one batch of two; the others alone
    assert [shape[0] for shape in sorted(batches)] == [1, 1, 2]


def record_batches(vocoder, monkeypatch):
    """The shapes of the mel batches `vocoder` hands BigVGAN from now on (a list filled as it runs)."""
    shapes, bigvgan = [], vocoder.bigvgan
    monkeypatch.setattr(vocoder, "bigvgan", type("Spy", (), {
        "hop": bigvgan.hop, "__call__": lambda self, mel: shapes.append(mel.shape) or bigvgan(mel)})())
    return shapes


@pytest.fixture(scope="module", params=["native", "ops"])
def each_kind(request):
    """A random BigVGAN with its activations as native kernels, or as MindSpore ops (the Ascend target)."""
    from mindone_ext.utils import native_kernels

    if request.param == "native" and vocoder_library() is None:
        pytest.skip("native kernels are not used here (the Ascend target)")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "ops":
            patch.setenv(native_kernels.ENV, "off")
        model = random_bigvgan()
    assert (model.native is not None) == (request.param == "native")
    return model


def test_rows_of_a_batch_each_of_its_own_length_equal_each_alone(each_kind):
    # each row's real frames its own (1 to the whole width): its samples are what it gets alone,
    # the padding past them never reaching them (zeroed before each convolution, never replicated)
    lengths = [1, 2, 17, 31, 32]
    mels = np.stack([MEL[i * 20:i * 20 + 32].T for i in range(len(lengths))])
    together = each_kind(Tensor(mels), Tensor(np.array(lengths, np.int32))).asnumpy().reshape(len(lengths), -1)
    for row, frames, mel in zip(together, lengths, mels):
        alone = each_kind(Tensor(mel[None]), Tensor(np.array([frames], np.int32))).asnumpy().reshape(-1)
        assert max_abs_diff(row[:frames * 6], alone[:frames * 6]) <= 1e-6, frames
        assert max_abs_diff(row[:frames * 6], op_by_op(each_kind, mel.T[:frames])) <= 1e-4, frames


def test_short_windows_of_several_answers_run_as_rows_of_one_call(each_kind):
    vocoder = recorded(Vocoder(each_kind, compiled=True, width=WIDTH, rows=4))
    rng = np.random.default_rng(3)
    # counts around 1, 2, 4 and 8 windows (rows padded to a power of two, up to 4 a call), of
    # lengths about the short graph's width; those wider run alone in the wide graph
    for count in (1, 2, 3, 4, 5, 8, 9):
        lengths = rng.choice([1, 5, SHORT_WIDTH - 1, SHORT_WIDTH, SHORT_WIDTH + 1, WIDTH], count).tolist()
        mels = [MEL[i:i + n] for i, n in enumerate(lengths)]
        alone = [op_by_op(each_kind, mel) for mel in mels]
        vocoder.ran = []
        for got, want, n in zip(vocoder.windows(mels), alone, lengths):
            assert got.shape == want.shape == (n * 6,) and max_abs_diff(got, want) <= 1e-4, (count, n)
        short = [n for n in lengths if n <= SHORT_WIDTH]
        calls = [short[i:i + 4] for i in range(0, len(short), 4)]
        want_calls = [(rows + rows[-1:] * ((1 << (len(rows) - 1).bit_length()) - len(rows)), SHORT_WIDTH)
                      for rows in calls] + [([n], WIDTH) for n in lengths if n > SHORT_WIDTH]
        assert sorted(vocoder.ran) == sorted(want_calls), count
