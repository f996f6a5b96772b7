import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as ref

from mindone_ext.nn.attention import ascend_attention, attention, check_attn_implementation, exact_attention, use_flash
from mindone_ext.nn.device import on_ascend
from mindone_ext.nn.kv_cache import causal_mask, step_mask
from mindone_ext.nn import rotary
from mindone_ext.nn.rotary import MultimodalRotaryEmbedding, apply_rotary, rope_inv_freq, rotate_half

from tests.conftest import KERNEL_TOLERANCE

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


def cache_mask(valid, start, t):
    """The reference's mask over a cache's slots: query i (at slot start + i) sees the valid slots
    up to its own."""
    slots = np.arange(valid.shape[1])
    return ((slots[None, :] <= (start + np.arange(t))[:, None])[None] & (valid[:, None, :] != 0))[:, None]


def test_exact_attention_matches_reference_gqa_with_padding_and_causal_mask():
    q, k, v = qkv()
    valid = np.ones((2, 9), np.int32)
    valid[1, :3] = 0
    mask = cache_mask(valid, 4, 5)
    got = exact_attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), 0.25).asnumpy()
    want = torch_reference_attention(q, k, v, mask, 0.25)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_causal_mask_is_the_reference_mask():
    valid = np.array([[0, 0, 1, 1, 1, 0]], np.int32)
    np.testing.assert_array_equal(causal_mask(Tensor(valid), 6).asnumpy(), cache_mask(valid, 0, 6))


@pytest.mark.parametrize("start", [0, 1, 5, 8, 9, 11])
def test_step_masks_are_the_reference_mask(start):
    """A piece of a prompt, attended after its write, sees the reference's mask over the cache's
    slots (its padded tokens past the last slot are not keys); a decode step sees the past slots
    and its new key apart, which put back in its slot is the reference's mask again."""
    slots, t = 12, 4
    valid = np.zeros((2, slots), np.int32)
    valid[:, :start + t] = 1
    valid[1, :3] = 0  # left padding
    valid[0, start + 1:start + 2] = 0  # a padding token among the new ones
    np.testing.assert_array_equal(step_mask(valid, [start, start], t), cache_mask(valid, start, t))
    one = valid.copy()
    one[:, start + 1:] = 0
    got = step_mask(one, [start, start], 1)
    assert got.shape == (2, 1, 1, slots + 1)
    placed = got[..., :slots].copy()
    placed[..., start] = got[..., slots]
    np.testing.assert_array_equal(placed, cache_mask(one, start, 1))


def test_a_decode_step_attending_to_the_past_apart_is_the_reference_over_all_keys():
    """A decode step attends to the cache's past slots and its new key as two tensors; the
    reference sees the key in its slot."""
    q, k, v = qkv(b=2, h=4, kv=2, t=1, s=9, d=16)
    new_k, new_v = qkv(b=2, h=4, kv=2, t=1, s=1, d=16)[1:]
    start = 5
    valid = np.ones((2, 9), np.int32)
    valid[:, start + 1:] = 0
    valid[1, :2] = 0
    placed_k, placed_v = k.copy(), v.copy()
    placed_k[:, :, start:start + 1], placed_v[:, :, start:start + 1] = new_k, new_v
    want = torch_reference_attention(q, placed_k, placed_v, cache_mask(valid, start, 1), 0.25)
    got = attention(Tensor(q), Tensor(new_k), Tensor(new_v), Tensor(step_mask(valid, [start] * 2, 1)), 0.25,
                    past=(Tensor(k), Tensor(v)))
    np.testing.assert_allclose(got.asnumpy(), want, atol=1e-5)


def torch_attention_with_keep_mask(q, k, v, keep, scale):
    """Softmax attention in float64 over the (B, N1, S1, S2) pairs `keep` marks, grouped-query heads
    by repetition (query head h uses key head h // (N1 / N2))."""
    q, k, v = (torch.tensor(np.asarray(x, np.float64)) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = torch.where(torch.tensor(keep), scale * q @ k.transpose(-1, -2), -torch.inf)
    return (torch.softmax(scores, -1) @ v).numpy()


LAYOUTS = {  # (B, N, S, D) -> the layout, and its head axis for key/value
    "BNSD": lambda x: x,
    "BSND": lambda x: x.transpose(0, 2, 1, 3),
    "BSH": lambda x: x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1),
    "SBH": lambda x: x.transpose(2, 0, 1, 3).reshape(x.shape[2], x.shape[0], -1),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("sparse_mode", [0, 2, 3])
def test_flash_attention_score_follows_its_documented_contract(layout, sparse_mode, ascend_kernels):
    """The kernel's conventions, against torch on the same half-rounded inputs: its layouts,
    grouped-query heads, scalar_value as the scale, attn_mask 1 = discard (mode 0), the top-left
    and bottom-right causal modes (2, 3) with their compressed 2048 x 2048 mask, query and key
    lengths that differ."""
    b, n1, n2, s1, s2, d, scale = 2, 4, 2, 5, 9, 32, 0.3
    q, k, v = (np.asarray(Tensor(x, ms.float16).astype(ms.float32).asnumpy()) for x in qkv(b, n1, n2, s1, s2, d))
    i, j = np.arange(s1)[:, None], np.arange(s2)[None, :]
    if sparse_mode == 0:
        discard = rng.random((b, 1, s1, s2)) < 0.3
        discard[..., 0] = False  # every query keeps a key: an all-discarded row is undefined
        mask, keep = Tensor(discard.astype(np.uint8)), ~discard
    else:
        mask = Tensor(np.triu(np.ones((2048, 2048), bool), 1))
        keep = np.broadcast_to(j <= i + (s2 - s1 if sparse_mode == 3 else 0), (b, n1, s1, s2))
    to = LAYOUTS[layout]
    out = ms.ops.flash_attention_score(Tensor(to(q), ms.float16), Tensor(to(k), ms.float16), Tensor(to(v), ms.float16),
                                       n1, attn_mask=mask, scalar_value=scale, input_layout=layout,
                                       sparse_mode=sparse_mode)
    want = to(torch_attention_with_keep_mask(q, k, v, np.broadcast_to(keep, (b, n1, s1, s2)), scale))
    assert out.dtype == ms.float16 and out.shape == want.shape
    np.testing.assert_allclose(out.astype(ms.float32).asnumpy(), want, **KERNEL_TOLERANCE["Float16"],
                               err_msg=ascend_kernels)


@pytest.mark.parametrize("dtype", [ms.float16, ms.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_flash_path_matches_the_exact_path_with_padding_rows(dtype, head_dim, ascend_kernels):
    """Grouped-query heads under a causal mask over a left-padded cache: rows of real queries equal
    the exact path's; rows with no key to attend (padding) come back finite (the stand-in makes such
    a row NaN if the kernel is asked for it)."""
    q, k, v = qkv(b=2, h=4, kv=2, t=5, s=9, d=head_dim)
    valid = np.ones((2, 9), np.int32)
    valid[1, :6] = 0  # row 1's first queries (slots 4, 5) see no valid key
    mask = Tensor(cache_mask(valid, 4, 5))
    rounded = [Tensor(x).astype(dtype) for x in (q, k, v)]
    got = ascend_attention(*rounded, mask, head_dim**-0.5).astype(ms.float32).asnumpy()
    want = exact_attention(*[x.astype(ms.float32) for x in rounded], mask, head_dim**-0.5).asnumpy()
    seen = mask.asnumpy().any(-1)[:, 0]  # (B, T): queries with a key to attend
    assert not seen.all() and np.isfinite(got).all(), ascend_kernels
    np.testing.assert_allclose(got[seen], want[seen], **KERNEL_TOLERANCE[str(dtype)], err_msg=ascend_kernels)


def test_flash_is_chosen_on_ascend_in_half_precision_for_the_head_sizes_it_takes():
    for head_dim in (64, 80, 128):
        assert use_flash("flash_attention_2", ms.float16, head_dim) == on_ascend()
        assert use_flash("flash_attention_2", ms.bfloat16, head_dim) == on_ascend()
    assert not use_flash("flash_attention_2", ms.float16, 72)  # not a multiple of 16
    assert not use_flash("flash_attention_2", ms.float16, 1024)  # past the kernel's 512
    assert not use_flash("flash_attention_2", ms.float32, 128)
    assert not use_flash("eager", ms.float16, 128)
    with pytest.raises(ValueError, match="attn_implementation"):
        check_attn_implementation("flash_attention_3")
    q, k, v = qkv()
    mask = np.ones((2, 1, 5, 9), bool)
    a = attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), 0.25, flash=False).asnumpy()
    np.testing.assert_allclose(a, torch_reference_attention(q, k, v, mask, 0.25), atol=1e-5)


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


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rotation_is_the_references_rotate_half_to_the_last_bit(head_dim, monkeypatch):
    """apply_rotary does rotate_half as a matmul by a signed permutation on the CPU (each output is
    one input or its negation) and element-wise on Ascend: both forms give the reference's
    result, op by op and compiled alike. The form this device takes, then the element-wise one
    forced (apply_rotary's own Ascend branch, which must have run)."""
    x = rng.standard_normal((2, 3, 5, head_dim)).astype(np.float32)
    cos, sin = (rng.standard_normal((2, 5, head_dim)).astype(np.float32) for _ in range(2))
    tx, tcos, tsin = map(torch.tensor, (x, cos, sin))
    want = (tx * tcos.unsqueeze(1) + ref.rotate_half(tx) * tsin.unsqueeze(1)).numpy()
    halves = []

    def ascend():
        return True

    def counted(x):  # op by op only: a compiled graph does not run Python
        halves.append(x.shape)
        return rotate_half(x)

    def check(run):
        got = run(Tensor(x), Tensor(cos), Tensor(sin)).asnumpy()
        if on_ascend():  # float32 element-wise and matmul kernels of another device: one rounding at most
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, want)

    check(apply_rotary)
    check(ms.jit(apply_rotary))
    monkeypatch.setattr(rotary, "on_ascend", ascend)
    check(ms.jit(apply_rotary))
    monkeypatch.setattr(rotary, "rotate_half", counted)
    check(apply_rotary)
    assert halves, "the element-wise form did not run"


def test_a_decoder_on_flash_attention_matches_the_exact_path(ascend_kernels):
    """Two layers in float16 over a left-padded batch: the padding rows' outputs feed the next
    layer's keys, so an undefined padding row would reach the real ones."""
    from mindone_ext.nn.decoder import Qwen2Decoder

    config = ref.Qwen2_5OmniTextConfig(vocab_size=64, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                       rope_scaling={"mrope_section": [4, 6, 6], "rope_type": "default", "type": "default"})
    flash, exact = Qwen2Decoder(config, ms.float16, "flash_attention_2"), Qwen2Decoder(config, ms.float32, "eager")
    for (name, p), (_, q) in zip(flash.parameters_and_names(), exact.parameters_and_names()):
        value = (1.0 if "norm" in name else 0.0) + 0.1 * rng.standard_normal(p.shape)
        p.set_data(Tensor(value, ms.float16))
        q.set_data(Tensor(value, ms.float16).astype(ms.float32))
    for layer in flash.layers:
        layer.self_attn.flash = True  # what use_flash chooses on a card
    valid = np.ones((2, 7), np.int32)
    valid[1, :3] = 0
    positions = np.broadcast_to(np.maximum(np.cumsum(valid, 1) - 1, 0), (3, 2, 7)).astype(np.int32)
    embeds = Tensor(rng.standard_normal((2, 7, 128)), ms.float16)
    got = flash(embeds, Tensor(positions), Tensor(valid))
    want = exact(embeds.astype(ms.float32), Tensor(positions), Tensor(valid))
    got, want = got.astype(ms.float32).asnumpy(), want.asnumpy()
    assert np.isfinite(got).all(), ascend_kernels
    real = valid.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=2e-2, atol=2e-2, err_msg=ascend_kernels)


@pytest.mark.parametrize("lengths", [[12, 7], [12, 12]], ids=["padded", "no padding"])
@pytest.mark.parametrize("step", [1, 2, 5, 6, 7, 11, 12, 13, 40])
def test_a_keys_only_layout_attends_in_row_chunks_as_the_full_mask_does(step, lengths, monkeypatch):
    """segmented_attention with a keys-only mask takes the query rows SCORES_AT_ONCE scores at a
    time (op by op: memory bounded); every chunk size around the segments' lengths gives what the
    (rows, rows) mask gives in one batch, with padded segments (masked) and without (no mask applied)."""
    import sys

    from mindone_ext.nn.attention import segment_layout, segmented_attention

    module = sys.modules["mindone_ext.nn.attention"]
    monkeypatch.setattr(module, "SCORES_AT_ONCE", step * 2 * 3 * 12)  # 2 segments, 3 heads, 12 slots
    calls, exact = [], module.exact_attention
    monkeypatch.setattr(module, "exact_attention", lambda q, k, v, mask, *a: calls.append((q.shape[2], mask is None))
                        or exact(q, k, v, mask, *a))
    q, k, v = (Tensor(np.random.default_rng(i).standard_normal((sum(lengths), 3, 8)).astype(np.float32))
               for i in range(3))
    whole = segmented_attention(q, k, v, segment_layout(lengths), 0.35).asnumpy()
    assert calls == [(12, False)]
    calls.clear()
    got = segmented_attention(q, k, v, segment_layout(lengths, keys_only=True), 0.35).asnumpy()
    assert calls == [(min(step, 12 - i), lengths == [12, 12]) for i in range(0, 12, step)]
    # a card's float32 kernels may tile a chunk's rows otherwise than the whole batch's; a wrong
    # chunk (rows attending to another segment's or a padded slot's keys) is off by ~0.1-1
    np.testing.assert_allclose(got, whole, **KERNEL_TOLERANCE["Float32"])


@pytest.mark.parametrize("lengths", [[16, 9], [16, 16]], ids=["padded", "no padding"])
def test_a_keys_only_layout_on_the_flash_kernel_gives_it_no_mask_without_padding(lengths, ascend_kernels, monkeypatch):
    """Long segments on the flash path (op by op, keys-only layout): the kernel gets no mask at all
    when no slot is padding (a large frame's (patches x patches) mask was ~4 GB for a 12 MP photo),
    the full one built from the keys' when some are; its rows equal exact attention's on the same
    rounded inputs (float16: the CPU has no bfloat16 gather for the stand-ins' run)."""
    from mindspore import ops

    from mindone_ext.nn.attention import segment_layout, segmented_attention

    dtype = ms.float16
    masks, kernel = [], ops.flash_attention_score
    monkeypatch.setattr(ops, "flash_attention_score", lambda *a, attn_mask=None, **kw: masks.append(
        None if attn_mask is None else tuple(attn_mask.shape)) or kernel(*a, attn_mask=attn_mask, **kw))
    q, k, v = (Tensor(np.random.default_rng(i).standard_normal((sum(lengths), 2, 16)).astype(np.float32)).astype(dtype)
               for i in range(3))
    got = segmented_attention(q, k, v, segment_layout(lengths, keys_only=True), 0.25, flash=True)
    want = segmented_attention(*(x.astype(ms.float32) for x in (q, k, v)), segment_layout(lengths), 0.25)
    assert masks == [None if lengths == [16, 16] else (2, 1, 16, 16)], (masks, ascend_kernels)
    np.testing.assert_allclose(got.astype(ms.float32).asnumpy(), want.asnumpy(), **KERNEL_TOLERANCE[str(dtype)],
                               err_msg=ascend_kernels)
