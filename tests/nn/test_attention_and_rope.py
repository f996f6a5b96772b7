import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as ref

from mindone_ext.nn.attention import ascend_attention, attention, check_attn_implementation, exact_attention, use_flash
from mindone_ext.nn.device import on_ascend
from mindone_ext.nn.kv_cache import causal_mask, write_kv
from mindone_ext.nn.rotary import MultimodalRotaryEmbedding, apply_rotary, rope_inv_freq

from tests.nn.test_portable_ops import assert_no_kernel_here

rng = np.random.default_rng(1)


def qkv(b=2, h=4, kv=2, t=5, s=9, d=16):
    return (rng.standard_normal((b, h, t, d)).astype(np.float32), rng.standard_normal((b, kv, s, d)).astype(np.float32),
            rng.standard_normal((b, kv, s, d)).astype(np.float32))


def torch_reference_attention(q, k, v, mask, scale):
    """The reference's eager attention (repeat_kv, additive mask of finfo.min, fp32 softmax)."""
    q, k, v = map(torch.tensor, (q, k, v))
    g = q.shape[1] // k.shape[1]
    additive = torch.where(torch.tensor(mask), 0.0, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = g, False
    out, _ = ref.eager_attention_forward(module, q, k, v, additive, scaling=scale)
    return out.reshape(out.shape[0], out.shape[1], -1).numpy()


def test_exact_attention_matches_reference_gqa_with_padding_and_causal_mask():
    q, k, v = qkv()
    valid = np.ones((2, 9), np.int32)
    valid[1, :3] = 0
    mask = causal_mask(Tensor(valid), Tensor(4, ms.int32), 5).asnumpy()
    got = exact_attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), 0.25).asnumpy()
    want = torch_reference_attention(q, k, v, mask, 0.25)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_causal_mask_is_the_reference_mask():
    valid = np.array([[0, 0, 1, 1, 1, 1, 0, 0]], np.int32)
    got = causal_mask(Tensor(valid), Tensor(2, ms.int32), 4).asnumpy()[0, 0]
    slots = np.arange(8)
    want = (slots[None, :] <= (2 + np.arange(4))[:, None]) & valid.astype(bool)
    np.testing.assert_array_equal(got, want)


def test_flash_path_is_called_with_valid_arguments():
    q, k, v = qkv(d=128)
    mask = np.ones((2, 1, 5, 9), bool)
    half = lambda x: Tensor(x, ms.float16)  # noqa: E731
    assert_no_kernel_here(lambda: ascend_attention(half(q), half(k), half(v), Tensor(mask), 128**-0.5))


def test_flash_is_only_chosen_on_ascend_in_half_precision():
    assert use_flash("flash_attention_2", ms.float16) == use_flash("flash_attention_2", ms.bfloat16) == on_ascend()
    assert not use_flash("flash_attention_2", ms.float32)
    assert not use_flash("eager", ms.float16)
    with pytest.raises(ValueError, match="attn_implementation"):
        check_attn_implementation("flash_attention_3")
    q, k, v = qkv()
    mask = np.ones((2, 1, 5, 9), bool)
    a = attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), 0.25, flash=False).asnumpy()
    np.testing.assert_allclose(a, torch_reference_attention(q, k, v, mask, 0.25), atol=1e-5)


def test_write_kv_writes_only_the_given_slots():
    cache = rng.standard_normal((1, 2, 8, 4)).astype(np.float32)
    new = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    got = write_kv(Tensor(cache), Tensor(new), Tensor(4, ms.int32)).asnumpy()
    want = cache.copy()
    want[:, :, 4:7] = new
    np.testing.assert_array_equal(got, want)
    one = write_kv(Tensor(cache), Tensor(new[:, :, :1]), Tensor(7, ms.int32)).asnumpy()
    want = cache.copy()
    want[:, :, 7:8] = new[:, :, :1]
    np.testing.assert_array_equal(one, want)


@pytest.mark.parametrize("section", [[2, 3, 3], [16, 24, 24]])
def test_multimodal_rope_matches_reference(section):
    head_dim = 2 * sum(section)
    config = ref.Qwen2_5OmniTextConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=1e6,
                                       rope_scaling={"mrope_section": section, "rope_type": "default", "type": "default"})
    positions = rng.integers(0, 3000, size=(3, 2, 6))
    x = torch.tensor(rng.standard_normal((2, 3, 6, head_dim)).astype(np.float32))
    cos_r, sin_r = ref.Qwen2_5OmniRotaryEmbedding(config)(x, torch.tensor(positions))
    want, _ = ref.apply_multimodal_rotary_pos_emb(x, x, cos_r, sin_r, section)
    inv = ref.Qwen2_5OmniRotaryEmbedding(config).inv_freq.numpy()
    # The frequencies come from float32 pow, whose last bit differs between libms (numpy's and
    # torch's disagree on 14 of these 64, by up to 2 ulps): at position 3000 that moves cos by up
    # to 4e-4. So the frequencies are compared in ulps, and the rotation itself is tested on the
    # reference's frequencies.
    np.testing.assert_array_max_ulp(rope_inv_freq(head_dim, 1e6), inv, maxulp=2)  # pow, then 1/x: two roundings
    rotary = MultimodalRotaryEmbedding(head_dim, 1e6, section)
    table = rotary.table.asnumpy()
    rotary.table = Tensor(np.where(table != 0, np.concatenate([inv, inv])[None, :], 0).astype(np.float32))
    cos, sin = rotary(Tensor(positions))
    got = apply_rotary(Tensor(x.numpy()), cos, sin).asnumpy()
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
