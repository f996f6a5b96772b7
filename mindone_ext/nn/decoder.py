"""The Qwen2 decoder (GQA attention with multimodal rope, SwiGLU MLP, RMSNorm), written once
and used by the Thinker's text model and the Talker.

Attribute names equal the reference checkpoint's (`self_attn.q_proj`, `input_layernorm`, ...).
`construct` serves both a plain forward (no cache: keys are the inputs themselves) and a
cached step (the new keys written into the cache in place, see kv_cache).
"""
import mindspore as ms
from mindspore import nn, ops

from .attention import attention, use_flash
from .kv_cache import causal_mask, read_past, write_new
from .layers import Embedding, Linear, RMSNorm
from .mlp import GatedMLP
from .rotary import MultimodalRotaryEmbedding, apply_rotary


def head_dim_of(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attend(q, k, v, cos, sin, mask, heads, past=None, step=None):
    """Attention of the projected q (B, T, H * D), k and v (B, T, KV * D), rotated by cos/sin;
    `heads` = (H, KV, D, flash). Without a cache the keys are k themselves; with one (`past`: a
    layer's (keys, values) buffers, `step`: see kv_cache) the new keys are written in place.
    Returns (B, T, H * D), before the output projection."""
    num_heads, num_kv_heads, head_dim, flash = heads
    b, t, _ = q.shape
    scale = head_dim**-0.5
    q = apply_rotary(q.reshape(b, t, num_heads, head_dim).swapaxes(1, 2), cos, sin)
    k = apply_rotary(k.reshape(b, t, num_kv_heads, head_dim).swapaxes(1, 2), cos, sin)
    v = v.reshape(b, t, num_kv_heads, head_dim).swapaxes(1, 2)
    if past is None:
        return attention(q, k, v, mask, scale, flash)
    if t == 1:  # a decode step: the past where it lies and the new key apart, then the write
        out = attention(q, k, v, mask, scale, flash, (read_past(past[0], step), read_past(past[1], step)))
        out = ops.depend(out, write_new(past[0], k, step))
        return ops.depend(out, write_new(past[1], v, step))
    # a piece of a prompt: written first, then attended with the rest of the cache
    keys = ops.depend(past[0], write_new(past[0], k, step))
    values = ops.depend(past[1], write_new(past[1], v, step))
    return attention(q, read_past(keys, step), read_past(values, step), mask, scale, flash)


class Qwen2Attention(nn.Cell):
    def __init__(self, config, dtype, attn_implementation):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.flash = use_flash(attn_implementation, dtype, self.head_dim)
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, True, dtype)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, True, dtype)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, True, dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, False, dtype)

    def construct(self, x, cos, sin, mask, past=None, step=None):
        return self.o_proj(attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, mask,
                                  (self.num_heads, self.num_kv_heads, self.head_dim, self.flash), past, step))


class Qwen2DecoderLayer(nn.Cell):
    def __init__(self, config, dtype, attn_implementation):
        super().__init__()
        self.self_attn = Qwen2Attention(config, dtype, attn_implementation)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype, act=config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def construct(self, x, cos, sin, mask, past=None, step=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Decoder(nn.Cell):
    """embed_tokens -> layers -> norm, with TMRoPE positions of shape (3, B, T)."""

    def __init__(self, config, dtype=ms.float32, attn_implementation="eager", embedding_size=None):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, embedding_size or config.hidden_size, dtype)
        self.layers = nn.CellList([Qwen2DecoderLayer(config, dtype, attn_implementation) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = MultimodalRotaryEmbedding(head_dim_of(config), config.rope_theta, config.rope_scaling["mrope_section"])

    def construct(self, inputs_embeds, position_ids, mask, cache=None):
        """inputs_embeds (B, T, H); position_ids (3, B, T). Without a cache, `mask` is (B, T), 1 for
        real tokens. With one, `cache` is (layers, step): per layer the (keys, values) Parameters,
        and the step's rows and slots (see kv_cache), and `mask` the step's boolean mask
        (kv_cache.step_mask). Returns hidden (B, T, H)."""
        step = None
        if cache is None:
            mask = causal_mask(mask, inputs_embeds.shape[1])
        else:
            step = cache[1]
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        hidden = inputs_embeds
        for i, layer in enumerate(self.layers):
            past = None if cache is None else cache[0][i]
            hidden = layer(hidden, cos, sin, mask, past, step)
        return self.norm(hidden)
