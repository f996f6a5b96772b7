"""The Qwen2 decoder (GQA attention with multimodal rope, SwiGLU MLP, RMSNorm), written once
and used by the Thinker's text model and the Talker.

Attribute names equal the reference checkpoint's (`self_attn.q_proj`, `input_layernorm`, ...).
`construct` serves both a plain forward (no cache: keys are the inputs themselves) and a
cached forward (keys are static cache buffers, written at `start`).
"""
import mindspore as ms
from mindspore import nn, ops

from .attention import attention, use_flash
from .kv_cache import causal_mask, write_kv
from .layers import Embedding, Linear, RMSNorm
from .mlp import GatedMLP
from .rotary import MultimodalRotaryEmbedding, apply_rotary


def head_dim_of(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Qwen2Attention(nn.Cell):
    def __init__(self, config, dtype, attn_implementation):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.scale = self.head_dim**-0.5
        self.flash = use_flash(attn_implementation, dtype, self.head_dim)
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, True, dtype)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, True, dtype)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, True, dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, False, dtype)

    def construct(self, x, cos, sin, mask, past=None, start=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim).swapaxes(1, 2)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim).swapaxes(1, 2)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim).swapaxes(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k, v = write_kv(past[0], k, start), write_kv(past[1], v, start)
        out = attention(q, k, v, mask, self.scale, self.flash)
        return self.o_proj(out), (k, v)


class Qwen2DecoderLayer(nn.Cell):
    def __init__(self, config, dtype, attn_implementation):
        super().__init__()
        self.self_attn = Qwen2Attention(config, dtype, attn_implementation)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype, act=config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def construct(self, x, cos, sin, mask, past=None, start=None):
        attn, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, start)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Qwen2Decoder(nn.Cell):
    """embed_tokens -> layers -> norm, with TMRoPE positions of shape (3, B, T)."""

    def __init__(self, config, dtype=ms.float32, attn_implementation="eager", embedding_size=None):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, embedding_size or config.hidden_size, dtype)
        self.layers = nn.CellList([Qwen2DecoderLayer(config, dtype, attn_implementation) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = MultimodalRotaryEmbedding(head_dim_of(config), config.rope_theta, config.rope_scaling["mrope_section"])

    def construct(self, inputs_embeds, position_ids, valid, past_key_values=None, start=None):
        """inputs_embeds (B, T, H); position_ids (3, B, T); valid (B, S) with S = T without a
        cache or the cache's slot count with one. Returns (hidden (B, T, H), presents)."""
        t = inputs_embeds.shape[1]
        if start is None:
            start = ops.zeros((), ms.int32)
        mask = causal_mask(valid, start, t)
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        hidden = inputs_embeds
        presents = ()
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            hidden, present = layer(hidden, cos, sin, mask, past, start)
            presents = presents + (present,)
        return self.norm(hidden), presents
