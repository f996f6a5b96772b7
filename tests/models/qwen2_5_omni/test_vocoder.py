"""The compiled vocoder against BigVGAN op by op (itself at parity with the reference in
test_speech.py): every length around the graph widths' boundaries, and windows of a long mel.
A small BigVGAN with random weights keeps each graph's compilation short."""
from types import SimpleNamespace

import numpy as np
import pytest
from mindspore import Tensor

from mindone_ext.models.qwen2_5_omni import vocoder as vocoder_module
from mindone_ext.models.qwen2_5_omni.bigvgan import Qwen2_5OmniToken2WavBigVGANModel
from mindone_ext.models.qwen2_5_omni.vocoder import Vocoder
from tests.conftest import max_abs_diff

CONFIG = SimpleNamespace(mel_dim=8, upsample_initial_channel=16, upsample_rates=[3, 2], upsample_kernel_sizes=[7, 4],
                         resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]])
MEL = (np.random.default_rng(1).standard_normal((160, CONFIG.mel_dim)) - 4).astype(np.float32)


@pytest.fixture(scope="module")
def bigvgan():
    model = Qwen2_5OmniToken2WavBigVGANModel(CONFIG)
    rng = np.random.default_rng(0)
    for _, p in model.parameters_and_names():
        p.set_data(Tensor((rng.standard_normal(p.shape) * 0.3).astype(np.float32)))
    return model


@pytest.fixture(scope="module")
def compiled(bigvgan):
    return Vocoder(bigvgan, compiled=True)


def op_by_op(bigvgan, mel):
    return bigvgan(Tensor(mel.T[None])).asnumpy().reshape(-1)


def test_every_length_around_the_graph_widths(bigvgan, compiled):
    for frames in list(range(1, 4)) + list(range(29, 36)) + list(range(61, 68)):
        want = op_by_op(bigvgan, MEL[:frames])
        got = compiled(MEL[:frames])
        assert got.dtype == np.float32 and got.shape == want.shape == (frames * 6,)
        assert max_abs_diff(got, want) <= 1e-4, frames
    assert compiled.widths == {32, 64, 96}  # three graphs served 17 lengths


def test_a_long_mel_in_windows_equals_the_whole(bigvgan, compiled, monkeypatch):
    monkeypatch.setattr(vocoder_module, "MAX_WINDOW", 64)  # windows of 32 new frames and 16 on each side
    for frames in (95, 96, 97, 160):  # the last window full, one frame long, or several windows
        want = op_by_op(bigvgan, MEL[:frames])
        assert max_abs_diff(compiled.span(MEL[:frames], 0, frames, context=16), want) <= 1e-4, frames
    # a span in the middle: what the streamed answer asks for
    assert max_abs_diff(compiled.span(MEL, 40, 90, context=16), op_by_op(bigvgan, MEL)[40 * 6:90 * 6]) <= 1e-4
    assert compiled.widths == {32, 64, 96}  # the windows' graphs are the first test's


def test_op_by_op_runs_the_span_in_one_call(bigvgan):
    plain = Vocoder(bigvgan)
    assert max_abs_diff(plain.span(MEL, 40, 90, context=40), op_by_op(bigvgan, MEL[:130])[40 * 6:90 * 6]) <= 1e-4
    assert plain.widths == set()


def test_spans_of_several_answers_equal_each_alone(bigvgan, monkeypatch):
    plain = Vocoder(bigvgan)
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
