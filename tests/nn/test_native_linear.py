"""The CPU's large linear layers through the native kernel (nn/native_linear.py, kernels/linear.cc:
oneDNN's sgemm on column slices of the output, one per core). Each side of its size and row
bounds, output widths around the slices' alignment: the product (float64 numpy), compiled and op
by op; its gradient is MatMul's; models whose projections take it equal the reference."""
import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor, ops

from mindone_ext.nn import native_linear
from mindone_ext.nn import ops as P
from mindone_ext.nn.device import on_ascend
from tests.conftest import max_abs_diff

pytestmark = pytest.mark.skipif(on_ascend(), reason="a CPU kernel (Ascend runs its own linear)")

SIDE = 1 << 10  # a SIDE x SIDE weight is the smallest the kernel takes (MIN_WEIGHT)
ALIGN = 16  # the kernel's slices are multiples of 16 columns
ROWS = [1, 15, 16, 17, 100, 2049]  # each side of MIN_ROWS; an encoder's rows, a long prompt's piece's


@pytest.fixture(scope="module", autouse=True)
def kernel():
    native_linear.enable()
    assert native_linear.KERNELS is not None, "the kernel must build here: g++ and MindSpore's oneDNN are installed"


def _linear(x, w, b):
    return P.exact_linear(x, w, b)


def _plain(x, w):
    return P.exact_linear(x, w)


def test_the_kernel_takes_min_rows_of_float32_weights_of_min_weight_elements_and_more():
    assert SIDE * SIDE == native_linear.MIN_WEIGHT and native_linear.MIN_ROWS == 16
    for shape, taken in (((SIDE, SIDE), True), ((SIDE, SIDE - 1), False), ((SIDE // 2, 2 * SIDE), True),
                         ((1, 1 << 20), True), ((64, 64), False)):
        assert native_linear.takes(16, Tensor(np.zeros(shape, np.float32)), ms.float32) == taken, shape
    big = np.zeros((SIDE, SIDE), np.float32)
    assert not native_linear.takes(15, Tensor(big), ms.float32)
    assert not native_linear.takes(16, Tensor(big, ms.float16), ms.float16)
    assert not native_linear.takes(16, Tensor(big), ms.float16)


@pytest.mark.parametrize("out_features", [SIDE - 1, SIDE, SIDE + ALIGN + 1])  # below the bound, at it, past it
def test_linear_equals_the_product_on_each_side_of_each_bound(out_features):
    rng = np.random.default_rng(out_features)
    w = (rng.standard_normal((out_features, SIDE)) / 32).astype(np.float32)
    b = rng.standard_normal(out_features).astype(np.float32)
    compiled, compiled_plain = ms.jit(_linear), ms.jit(_plain)
    for rows in ROWS:
        # rows as (2, rows / 2, in) where even: the kernel counts the rows of every leading axis
        shape = (2, rows // 2, SIDE) if rows % 2 == 0 else (rows, SIDE)
        x = rng.standard_normal(shape).astype(np.float32)
        product = x.astype(np.float64) @ w.T.astype(np.float64)
        for name, got, want in (("compiled", compiled(Tensor(x), Tensor(w), Tensor(b)), product + b),
                                ("op by op", P.exact_linear(Tensor(x), Tensor(w), Tensor(b)), product + b),
                                ("compiled, no bias", compiled_plain(Tensor(x), Tensor(w)), product)):
            assert got.shape == shape[:-1] + (out_features,), (name, rows)
            assert max_abs_diff(got.asnumpy(), want) <= 2e-5, (name, rows)


@pytest.mark.parametrize("out_features", [1, ALIGN - 1, ALIGN, ALIGN + 1, 2 * ALIGN + 3])
def test_narrow_outputs_over_a_long_input_fill_every_column(out_features):
    """Fewer columns than a slice per core (one thread, or two): the slices cover each column once."""
    into = native_linear.MIN_WEIGHT  # the smallest input that takes the kernel with one output
    rng = np.random.default_rng(out_features)
    w = (rng.standard_normal((out_features, into)) / 1024).astype(np.float32)
    b = rng.standard_normal(out_features).astype(np.float32)
    x = rng.standard_normal((native_linear.MIN_ROWS, into)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64) + b
    assert max_abs_diff(P.exact_linear(Tensor(x), Tensor(w), Tensor(b)).asnumpy(), want) <= 1e-4


def _loss(x, w, b):
    return (P.exact_linear(x, w, b) ** 2).sum()


def _matmul_loss(x, w, b):
    return ((ops.matmul(x, w.T) + b) ** 2).sum()


@pytest.mark.parametrize("compiled", [False, True])
def test_its_gradients_are_matmuls(compiled):
    """Adapters train through it: x's, the weight's and the bias's gradients as MatMul's."""
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((2, 9, SIDE)).astype(np.float32))
    w = Tensor((rng.standard_normal((SIDE + 3, SIDE)) / 32).astype(np.float32))
    b = Tensor(rng.standard_normal(SIDE + 3).astype(np.float32))
    grad = ms.grad(_loss, (0, 1, 2))
    got = (ms.jit(grad) if compiled else grad)(x, w, b)
    want = ms.grad(_matmul_loss, (0, 1, 2))(x, w, b)
    for name, g, h in zip(("x", "weight", "bias"), got, want):
        assert g.shape == h.shape, name
        assert max_abs_diff(g.asnumpy(), h.asnumpy()) <= 1e-5 * np.abs(h.asnumpy()).max(), name


def test_without_the_kernel_linear_runs_matmul(monkeypatch):
    """Native kernels off (or no compiler, no oneDNN): the same product through MatMul, bit for bit
    what mint's linear gives in a graph."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, SIDE)).astype(np.float32)
    w = (rng.standard_normal((SIDE, SIDE)) / 32).astype(np.float32)
    monkeypatch.setattr(native_linear, "KERNELS", None)
    assert not native_linear.takes(20, Tensor(w), ms.float32) and native_linear.library() is None
    got = P.exact_linear(Tensor(x), Tensor(w)).asnumpy()
    np.testing.assert_array_equal(got, ops.MatMul(transpose_b=True)(Tensor(x), Tensor(w)).asnumpy())


@pytest.mark.parametrize("windows", [1, 3])  # 50 rows; 150 (padded to 4 windows)
def test_a_wide_audio_encoder_through_the_kernel_equals_the_reference(windows):
    """An audio encoder whose every projection is SIDE x SIDE (the kernel's), its compiled layers
    against the reference on the same weights."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as reference
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig

    from bench.common import copy_weights
    from mindone_ext.models.qwen2_5_omni.audio_encoder import Qwen2_5OmniAudioEncoder

    config = Qwen2_5OmniAudioEncoderConfig(d_model=SIDE, encoder_layers=1, encoder_attention_heads=16,
                                           encoder_ffn_dim=SIDE, n_window=50, output_dim=64, num_mel_bins=128)
    torch.manual_seed(windows)
    theirs = reference.Qwen2_5OmniAudioEncoder._from_config(config, attn_implementation="eager").eval()
    ours = Qwen2_5OmniAudioEncoder(config)
    copy_weights(theirs, ours)
    lens = np.array([100 * windows - 7])  # windows of 100 mel frames, 50 tokens
    feats = np.random.default_rng(windows).standard_normal((128, lens.sum())).astype(np.float32)
    got = ours(feats, lens).asnumpy()
    with torch.no_grad():
        cnn, _ = theirs._get_feat_extract_output_lengths(torch.tensor(lens))
        want = theirs(torch.tensor(feats), feature_lens=torch.tensor(lens), aftercnn_lens=cnn).last_hidden_state
    assert ours._windows == {1 << (windows - 1).bit_length()}
    assert native_linear.takes(50, ours.layers[0].fc1.weight, ms.float32)
    assert got.shape == want.shape and np.abs(want.numpy()).mean() > 0.1
    assert max_abs_diff(got, want.numpy()) <= 1e-4


def test_a_wide_dit_through_the_kernel_equals_the_reference():
    """A DiT block as wide as the 7B's (1024: its projections are the kernel's, in the checkpoint's
    layout), its compiled guided velocity against the reference's forward on the same weights."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as reference
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniToken2WavConfig

    from bench.common import copy_weights
    from mindone_ext.models.qwen2_5_omni.token2wav import Qwen2_5OmniToken2WavModel

    config = Qwen2_5OmniToken2WavConfig(
        dit_config=dict(hidden_size=SIDE, num_hidden_layers=1, num_attention_heads=16, head_dim=64,
                        look_ahead_layers=[0], look_backward_layers=[0], enc_emb_dim=16, enc_dim=32,
                        enc_channels=[32, 32, 32, 32, 96], enc_attention_channels=16, enc_se_channels=16),
        bigvgan_config=dict(upsample_initial_channel=128, resblock_kernel_sizes=[3, 7],
                            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]]))
    torch.manual_seed(5)
    theirs = reference.Qwen2_5OmniToken2WavModel._from_config(config).eval().float()
    ours = Qwen2_5OmniToken2WavModel(config)
    copy_weights(theirs, ours)
    dit = ours.code2wav_dit_model
    assert native_linear.takes(2 * 62, dit.transformer_blocks[0].attn.to_q.weight, ms.float32)  # with guidance
    rng = np.random.default_rng(5)
    frames, scale = 62, 0.5  # a partial last block
    x = rng.standard_normal((1, frames, 80)).astype(np.float32)
    mel = rng.standard_normal((1, 40, 80)).astype(np.float32)
    cond = rng.standard_normal((1, frames, 16)).astype(np.float32)
    code = rng.integers(0, 8193, size=(1, frames // 2))
    cos, sin, masks = dit.frame_inputs(frames, ms.float32)
    voice = ours.speaker_voice(mel, scale)
    got = ours.velocity(Tensor(x), Tensor(cond), Tensor(code, ms.int32), Tensor(np.float32(0.37)), cos, sin, masks,
                        scale, voice).asnumpy()
    with torch.no_grad():
        out = theirs.code2wav_dit_model(torch.tensor(x), torch.tensor(mel), torch.tensor(cond), torch.tensor(code),
                                        torch.tensor(0.37), apply_cfg=True).numpy()
    guided, null = np.split(out, 2)
    want = guided + (guided - null) * scale
    assert np.abs(want).mean() > 0.1 and max_abs_diff(got, want) <= 1e-4
