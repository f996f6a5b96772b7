"""The CPU's linear in its two layouts (nn/ops.py `exact_linear`): x @ W.T, and (W @ x.T).T for
the row counts and weight sizes where MindSpore's CPU MatMul runs that faster. Each side of each
bound gives the product (float64 numpy), compiled and op by op, and a model whose projections take
the flipped form still equals the reference."""
import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor

from mindone_ext.nn import ops as P
from tests.conftest import max_abs_diff

LOW, HIGH = P.FLIPPED_ROWS
ROWS = sorted({1, 2, LOW - 1, LOW, LOW + 1, 100, HIGH - 1, HIGH, HIGH + 1, 2 * HIGH})
SIDE = 1 << 10  # a SIDE x SIDE weight is the smallest that flips (FLIPPED_MIN_WEIGHT)


def _linear(x, w, b):
    return P.exact_linear(x, w, b)


def test_the_bounds_are_where_these_tests_sweep():
    assert SIDE * SIDE == P.FLIPPED_MIN_WEIGHT
    assert P.flipped(LOW, (SIDE, SIDE)) and P.flipped(HIGH, (SIDE, SIDE))
    assert not P.flipped(LOW - 1, (SIDE, SIDE)) and not P.flipped(HIGH + 1, (SIDE, SIDE))
    assert not P.flipped(100, (SIDE, SIDE - 1)) and P.flipped(100, (SIDE // 2, 2 * SIDE))
    widest = P.FLIPPED_MAX_WIDENING * SIDE // 2  # output features from SIDE / 2 inputs
    assert P.flipped(100, (widest, SIDE // 2)) and not P.flipped(100, (widest + 1, SIDE // 2))


@pytest.mark.parametrize("out_features", [SIDE - 1, SIDE])  # just below the flipping size, and at it
def test_linear_equals_the_product_on_each_side_of_each_bound(out_features):
    rng = np.random.default_rng(out_features)
    w = (rng.standard_normal((out_features, SIDE)) / 32).astype(np.float32)
    b = rng.standard_normal(out_features).astype(np.float32)
    compiled = ms.jit(_linear)
    for rows in ROWS:
        # rows as (2, rows / 2, in) where even: the flip counts the rows of every leading axis
        shape = (2, rows // 2, SIDE) if rows % 2 == 0 else (rows, SIDE)
        x = rng.standard_normal(shape).astype(np.float32)
        want = x.astype(np.float64) @ w.T.astype(np.float64) + b
        for name, got in (("compiled", compiled(Tensor(x), Tensor(w), Tensor(b))),
                          ("op by op", P.exact_linear(Tensor(x), Tensor(w), Tensor(b)))):
            assert got.shape == shape[:-1] + (out_features,), (name, rows)
            assert max_abs_diff(got.asnumpy(), want) <= 2e-5, (name, rows, P.flipped(rows, w.shape))


@pytest.mark.parametrize("windows", [1, 2, 3])  # 50, 100 rows (flipped) and 200 (padded to 4 windows: not)
def test_a_wide_audio_encoder_with_flipped_projections_equals_the_reference(windows):
    """An audio encoder whose every projection is SIDE x SIDE, its compiled layers against the
    reference on the same weights, with the flipped form taken and not."""
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
    rows = 50 * (1 << (windows - 1).bit_length())
    assert ours._windows == {rows // 50} and P.flipped(rows, (SIDE, SIDE)) == (windows < 3)
    assert got.shape == want.shape and np.abs(want.numpy()).mean() > 0.1
    assert max_abs_diff(got, want.numpy()) <= 1e-4
