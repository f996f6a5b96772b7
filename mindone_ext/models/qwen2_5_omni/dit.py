"""The Token2Wav DiT: codec tokens + speaker condition -> mel frames by flow matching.

A transformer over mel frames with AdaLN-zero modulation by the time step, and a block-wise
attention mask: frames are grouped in blocks of `block_size`; a layer sees its own block plus
one block back (`look_backward_layers`) and/or ahead (`look_ahead_layers`), which bounds the
future context a chunk needs when streaming. Names mirror the reference
(`token2wav.code2wav_dit_model.*`); forward arguments too.
"""
import math
from typing import Any, NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ...nn import native_linear, ops as P
from ...nn.layers import Embedding, Linear
from ...nn.rotary import rope_inv_freq
from ...utils import native_kernels
from .ecapa import ECAPA_TimeDelayNet

ATTENTION_SOURCE = native_kernels.source("window_attention.cc")
MODULATION_SOURCE = native_kernels.source("dit_modulation.cc")
BLOCK_SOURCE = "dit_block.cc"  # built against MindSpore's oneDNN (native_linear.onednn_library)


class SiLU(nn.Cell):
    def construct(self, x):
        return P.silu(x)


class GELUTanh(nn.Cell):
    def construct(self, x):
        return P.gelu_tanh(x)


def layer_norm_no_affine(x, eps=1e-6):
    return P.layer_norm(x, None, None, eps)


def modulated_norm(x, scale, shift, native=None):
    """AdaLN: LayerNorm(x) (no affine) * (1 + scale) + shift; x (B, T, D), scale and shift (B or 1, D).
    `native`: the same as one CPU kernel (`DiTKernels.modulated_norm`), or None for MindSpore ops."""
    if native is not None:
        return native(x, scale, shift)
    return layer_norm_no_affine(x) * (1 + scale.expand_dims(1)) + shift.expand_dims(1)


def gated_residual(x, gate, y, bias, native=None):
    """x + gate * (y + bias); x and y (B, T, D), gate (B or 1, D), bias (D,): y's projection's, which
    the kernel adds itself. `native`: as for `modulated_norm`."""
    if native is not None:
        return native(x, gate, y, bias)
    return x + gate.expand_dims(1) * (y + bias)


def gelu_tanh(x, bias, native=None):
    """GELU's tanh form of x + bias (x's projection's bias). `native`: as for `modulated_norm`."""
    if native is not None:
        return native(x, bias)
    return P.gelu_tanh(x + bias)


def timestep_features(t, dim=256, scale=1000.0):
    """Sinusoidal features of the flow time (B,) -> (B, dim), float32 as the reference."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1))).astype(np.float32)
    angles = (scale * t).expand_dims(1) * Tensor(freqs).expand_dims(0)
    return ops.cat((ops.sin(angles), ops.cos(angles)), -1)


def rotation_tables(cos, sin, heads):
    """Rotary tables (T, head_dim) -> (heads, T, head_dim) that rotate only the first head, as the
    reference does (query[:, :1]): the other heads get cos 1 and sin 0, which leave them exactly
    as they are, so a layer rotates all heads at once instead of slicing one out and back in."""
    rest = heads - 1
    return (np.concatenate([cos[None], np.ones((rest,) + cos.shape, cos.dtype)]),
            np.concatenate([sin[None], np.zeros((rest,) + sin.shape, sin.dtype)]))


def pair_rotation(head_dim):
    """(head_dim, head_dim) matrix R with x @ R = (-x1, x0, -x3, x2, ...): the DiT's interleaved
    rotary layout as one matmul (each output is one input, exactly, or its negation)."""
    r = np.zeros((head_dim, head_dim), np.float32)
    r[1::2, 0::2] = -np.eye(head_dim // 2, dtype=np.float32)
    r[0::2, 1::2] = np.eye(head_dim // 2, dtype=np.float32)
    return r


def rotate(x, cos, sin):
    """x (B, heads, T, head_dim) rotated by `rotation_tables`' cos and sin: 4 kernels, where
    slicing the first head out, rotating its pairs and joining it back took 14."""
    return x * cos + ops.matmul(x, Tensor(pair_rotation(x.shape[-1]), x.dtype)) * sin


def block_window(frames, block_size, back, ahead, length=None):
    """The block mask as gathers: query frame i sees frame j when block(j) - block(i) is in
    [-back, ahead]. Each query block attends to the (back + 1 + ahead) blocks around it, so
    attention costs T x window instead of T x T (memory and time), with the same keys.
    `length` >= frames pads the sequence: padded frames are never keys, so the real frames'
    outputs do not depend on them (one compiled shape serves many frame counts). `frames` may be
    a list, one count per batch row (windows of several answers solved together).
    Returns (key frame per window slot (blocks * width,), valid slots ([rows,] blocks, block_size, width))."""
    length = length or max(np.atleast_1d(frames))
    blocks = -(-length // block_size)
    width = (back + 1 + ahead) * block_size
    first = (np.arange(blocks) - back) * block_size  # first key frame of each query block's window
    keys = first[:, None] + np.arange(width)[None, :]
    valid = (keys >= 0) & (keys < np.asarray(frames)[..., None, None])  # ([rows,] blocks, width)
    return (Tensor(np.clip(keys, 0, length - 1).reshape(-1).astype(np.int32)),
            Tensor(np.broadcast_to(valid[..., None, :], valid.shape[:-1] + (block_size, width)).copy()))


def rotary_window_attention(q, k, v, biases, cos, sin, window, heads, head_dim, native=None):
    """q, k, v (B, T, heads * head_dim) as projected, without their `biases` (q's, k's, v's) ->
    (B, T, heads * head_dim): the queries and keys rotated (`rotate`, by `rotation_tables`' cos and
    sin), each query block over its key window. `native`: the same as one CPU kernel
    (`attention_kernel`), or None for MindSpore ops."""
    scale = head_dim**-0.5
    if native is not None:
        return native(q, k, v, *biases, cos, sin, *window, Tensor(np.array([scale], np.float32)))
    b, t, _ = q.shape
    q, k, v = ((x + bias).reshape(b, t, heads, head_dim).swapaxes(1, 2) for x, bias in zip((q, k, v), biases))
    return window_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, window, scale)


def window_attention(q, k, v, window, scale):
    """q, k, v (B, H, T, D) -> (B, T, H * D), each query block over its key window."""
    keys, valid = window
    b, h, t, d = q.shape
    n, size, width = valid.shape[-3:]
    if valid.ndim == 4:  # a mask per row: the heads share it
        valid = valid.expand_dims(1)
    if n * size > t:
        q = ops.cat((q, ops.zeros((b, h, n * size - t, d), q.dtype)), 2)
    q = q.reshape(b, h, n, size, d)
    k = ops.gather(k, keys, 2).reshape(b, h, n, width, d)
    v = ops.gather(v, keys, 2).reshape(b, h, n, width, d)
    scores = ops.matmul(q, k.swapaxes(-1, -2)) * scale  # (B, H, blocks, size, width)
    # A finite floor, not -inf: MindSpore's CPU softmax corrupts every row of the tensor when one
    # row is entirely -inf (a padded block with no valid key): measured with MindSpore 2.7.1.
    floor = ops.full_like(scores, -3.4028234663852886e38, dtype=ms.float32)
    scores = ops.where(valid, scores.astype(ms.float32), floor)
    out = ops.matmul(ops.softmax(scores, -1).astype(q.dtype), v).reshape(b, h, n * size, d)[:, :, :t]
    return out.swapaxes(1, 2).reshape(b, t, h * d)


def attention_kernel(library):
    """`rotary_window_attention` as one native CPU kernel (kernels/window_attention.cc, built as
    `library`; ~30 MindSpore kernels a block otherwise), or None when `library` is None."""
    return native_kernels.custom_op(library, "WindowAttention")


class DiTKernels(NamedTuple):
    """The DiT's native CPU kernels (MindSpore custom ops), each None for MindSpore ops: the window
    attention with its rotary embedding (kernels/window_attention.cc) and the element-wise steps
    around it (kernels/dit_modulation.cc), used where a block is not one kernel; the whole block
    (kernels/dit_block.cc, with oneDNN's sgemm). `libraries`: the built files' paths, part of a
    graph's key."""
    attention: Any = None
    modulated_norm: Any = None
    gated_residual: Any = None
    gelu_tanh: Any = None
    block: Any = None
    libraries: tuple = ()

    @classmethod
    def build(cls, dtype):
        """Built for float32 on the CPU when a compiler is there (native_kernels.library), else ops."""
        if dtype != ms.float32:
            return cls()
        native_linear.enable()  # (its large linears too: nn/native_linear.py)
        attention, modulation = native_kernels.library(ATTENTION_SOURCE), native_kernels.library(MODULATION_SOURCE)
        block = native_linear.onednn_library(BLOCK_SOURCE)
        element_wise = [native_kernels.custom_op(modulation, name) for name in ("ModulatedNorm", "GatedResidual",
                                                                                 "GeluTanh")]
        return cls(attention_kernel(attention), *element_wise, native_kernels.custom_op(block, "DiTBlock"),
                   (attention, modulation, block))


class DiTTimestepEmbedding(nn.Cell):
    def __init__(self, dim, dtype, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.SequentialCell([Linear(freq_dim, dim, True, dtype), SiLU(), Linear(dim, dim, True, dtype)])

    def weights(self):
        return self.time_mlp[0].weight, self.time_mlp[0].bias, self.time_mlp[2].weight, self.time_mlp[2].bias

    def construct(self, t):
        return timestep_embedding(t, self.weights(), self.freq_dim)


def timestep_embedding(t, weights, freq_dim=256):
    w1, b1, w2, b2 = weights
    linear = P.linear
    return linear(P.silu(linear(timestep_features(t, freq_dim).astype(t.dtype), w1, b1)), w2, b2)


class DiTCodecEmbedding(nn.Cell):
    def __init__(self, num_embeds, dim, repeats, dtype):
        super().__init__()
        self.repeats = repeats
        self.codec_embed = Embedding(num_embeds + 1, dim, dtype)

    def construct(self, code, drop_code=False):
        return codec_embedding(code, self.codec_embed.weight, self.repeats, drop_code)


def codec_embedding(code, table, repeats, drop_code=False):
    if drop_code:
        code = ops.zeros_like(code)
    e = P.embedding(code, table)  # (B, N, D) -> each code covers `repeats` mel frames
    b, n, d = e.shape
    return ops.tile(e.expand_dims(2), (1, 1, repeats, 1)).reshape(b, n * repeats, d)


class DiTInputEmbedding(nn.Cell):
    def __init__(self, config, dtype):
        super().__init__()
        self.proj = Linear(config.mel_dim + config.enc_dim + config.enc_emb_dim + config.emb_dim, config.hidden_size,
                           True, dtype)
        self.spk_encoder = ECAPA_TimeDelayNet(config, dtype)

    def reference_voice(self, condition_vector, drop_audio_cond=False, apply_cfg=True):
        """The ECAPA embedding of the reference mel (B, or 2B with the unconditioned half). It
        depends on nothing else, so an ODE solve computes it once instead of in each DiT call."""
        if apply_cfg:
            condition_vector = ops.cat((condition_vector, ops.zeros_like(condition_vector)), 0)
        elif drop_audio_cond:
            condition_vector = ops.zeros_like(condition_vector)
        return self.spk_encoder.encode(condition_vector)

    def construct(self, x, speaker_embedding, condition_vector, code_embed, drop_audio_cond=False,
                  code_embed_uncond=None, apply_cfg=True, voice=None):
        if voice is None:
            voice = self.reference_voice(condition_vector, drop_audio_cond, apply_cfg)
        conditions = frame_conditions(speaker_embedding, code_embed, code_embed_uncond, voice, drop_audio_cond,
                                      apply_cfg)
        return input_embedding(x, conditions, self.proj.weight, self.proj.bias, apply_cfg)


def frame_conditions(speaker_embedding, code_embed, code_embed_uncond, voice, drop_audio_cond, apply_cfg):
    """What the input projection reads of each frame besides the noisy mel, (B, T, ...) or (2B, ...)
    with the unconditioned half: the speaker's voice, the codes' embedding and the conditioning
    vector, in the reference's order. Nothing in it changes during an ODE solve, so a solve makes it
    once, not in each of its 36 DiT evaluations (~17 of the tiny DiT's ~44 graph kernels each)."""
    if apply_cfg:  # conditioned and unconditioned halves in one batch
        speaker_embedding = ops.cat((speaker_embedding, ops.zeros_like(speaker_embedding)), 0)
        code_embed = ops.cat((code_embed, code_embed_uncond), 0)
    elif drop_audio_cond:
        speaker_embedding = ops.zeros_like(speaker_embedding)
    speaker = ops.tile(voice.expand_dims(1), (1, code_embed.shape[1], 1))
    return ops.cat((speaker, code_embed, speaker_embedding), -1)


def input_embedding(x, conditions, weight, bias, apply_cfg):
    """The input projection of the noisy mel x (B, T, mel) beside its `frame_conditions`."""
    if apply_cfg:
        x = ops.cat((x, x), 0)
    return P.linear(ops.cat((x, conditions), -1), weight, bias)


def dit_layer(x, t_emb, cos, sin, window, weights, heads, head_dim, kernels=DiTKernels()):
    """One DiT block as a pure function of its weights (see `DiTDecoderLayer.weights`): AdaLN-zero
    modulation by the time embedding, windowed attention with rotary on the first head, GELU-tanh
    MLP. Written over weights rather than a cell so that one compiled graph serves every layer:
    MindSpore's CPU backend keeps each graph's intermediates allocated, and 22 per-layer graphs
    (or one graph of the whole DiT) held 7.5 GB at 10 s of speech against ~1 GB for one shared.
    `kernels`: the native CPU kernels to use (`DiTKernels`; default none: MindSpore ops): the whole
    block as one (kernels/dit_block.cc: the tiny checkpoint's block is bound by its ~14 kernels'
    launches; an ODE window of one answer 76 -> 52 ms; the released shapes' block as fast as its
    steps), else its steps. On the CPU the 7B's projections run through oneDNN's sgemm in the
    checkpoint's layout (nn/native_linear.py; in the block kernel, sgemm.h): it took 0.57-0.91x the
    time of MatMul on (in, out) copies of the matrices, which the graphs had taken before (+0.7 GB,
    measured then; 4 evaluations of 1 x 48 frames 1.22-1.26 s -> 0.82-0.84 s, 144 frames 3.1-3.6 s
    -> 2.06-2.18 s, 456 frames 7.2-7.7 s -> 6.45-6.53 s)."""
    if kernels.block is not None:  # the whole block as one kernel: the same steps (see kernels/dit_block.cc)
        return kernels.block(x, t_emb, *weights, cos, sin, *window, Tensor(np.array([head_dim**-0.5], np.float32)))
    norm_w, norm_b, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, up_w, up_b, down_w, down_b = weights
    linear = P.linear
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ops.chunk(linear(P.silu(t_emb), norm_w, norm_b), 6, 1)
    # each projection's bias is added by what follows it (on the CPU, inside its native kernel)
    h = modulated_norm(x, scale_msa, shift_msa, kernels.modulated_norm)
    q, k, v = (linear(h, w) for w in (q_w, k_w, v_w))
    # rotary on the first head only (see rotation_tables)
    attended = rotary_window_attention(q, k, v, (q_b, k_b, v_b), cos, sin, window, heads, head_dim, kernels.attention)
    x = gated_residual(x, gate_msa, linear(attended, o_w), o_b, kernels.gated_residual)
    h = modulated_norm(x, scale_mlp, shift_mlp, kernels.modulated_norm)
    up = gelu_tanh(linear(h, up_w), up_b, kernels.gelu_tanh)
    return gated_residual(x, gate_mlp, linear(up, down_w), down_b, kernels.gated_residual)


EMBED_WEIGHTS, BLOCK_WEIGHTS, OUTPUT_WEIGHTS = 7, 14, 4  # their counts in the DiT's `weights()`


def split_weights(weights, blocks):
    """`Qwen2_5OmniToken2WavDiTModel.weights()` -> (the input side's, each block's, the output's)."""
    per_block = ()
    for i in range(blocks):
        first = EMBED_WEIGHTS + BLOCK_WEIGHTS * i
        per_block += (weights[first:first + BLOCK_WEIGHTS],)
    return weights[:EMBED_WEIGHTS], per_block, weights[-OUTPUT_WEIGHTS:]


class AdaLayerNormZero(nn.Cell):
    def __init__(self, dim, dtype, chunks):
        super().__init__()
        self.linear = Linear(dim, dim * chunks, True, dtype)


class DiTAttention(nn.Cell):
    def __init__(self, config, dtype):
        super().__init__()
        inner = config.head_dim * config.num_attention_heads
        self.to_q = Linear(config.hidden_size, inner, True, dtype)
        self.to_k = Linear(config.hidden_size, inner, True, dtype)
        self.to_v = Linear(config.hidden_size, inner, True, dtype)
        self.to_out = nn.CellList([Linear(inner, config.hidden_size, True, dtype)])


class DiTMLP(nn.Cell):
    def __init__(self, dim, mult, dtype):
        super().__init__()
        inner = int(dim * mult)
        # ff.0 Linear, ff.1 GELU(tanh), ff.2 Dropout (identity at inference), ff.3 Linear
        self.ff = nn.CellList([Linear(dim, inner, True, dtype), GELUTanh(), nn.Identity(), Linear(inner, dim, True, dtype)])


class DiTDecoderLayer(nn.Cell):
    def __init__(self, config, look_ahead, look_backward, dtype):
        super().__init__()
        self.look_ahead, self.look_backward = look_ahead, look_backward
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.attn_norm = AdaLayerNormZero(config.hidden_size, dtype, 6)
        self.attn = DiTAttention(config, dtype)
        self.ff = DiTMLP(config.hidden_size, config.ff_mult, dtype)

    def weights(self):
        a, f = self.attn, self.ff.ff
        norm, out, up, down = self.attn_norm.linear, a.to_out[0], f[0], f[3]
        # written out (not a nested comprehension) so that a compiled graph can call it too
        return (norm.weight, norm.bias, a.to_q.weight, a.to_q.bias, a.to_k.weight, a.to_k.bias, a.to_v.weight,
                a.to_v.bias, out.weight, out.bias, up.weight, up.bias, down.weight, down.bias)

    def construct(self, x, t_emb, cos, sin, window, kernels=DiTKernels()):
        return dit_layer(x, t_emb, cos, sin, window, self.weights(), self.heads, self.head_dim, kernels=kernels)


class Qwen2_5OmniToken2WavDiTModel(nn.Cell):
    def __init__(self, config, dtype=ms.float32):
        super().__init__()
        self.mel_dim, self.repeats, self.block_size = config.mel_dim, config.repeats, config.block_size
        self.num_embeds = config.num_embeds
        self.head_dim = config.head_dim
        self.time_embed = DiTTimestepEmbedding(config.hidden_size, dtype)
        self.text_embed = DiTCodecEmbedding(config.num_embeds, config.emb_dim, config.repeats, dtype)
        self.input_embed = DiTInputEmbedding(config, dtype)
        self.transformer_blocks = nn.CellList([
            DiTDecoderLayer(config, int(i in config.look_ahead_layers), int(i in config.look_backward_layers), dtype)
            for i in range(config.num_hidden_layers)])
        # the window attention and the blocks' element-wise steps as native CPU kernels, for float32
        self.kernels = DiTKernels.build(dtype)
        self.norm_out = nn.Cell()
        self.norm_out.linear = Linear(config.hidden_size, config.hidden_size * 2, True, dtype)
        self.proj_out = Linear(config.hidden_size, config.mel_dim, True, dtype)
        # the checkpoint stores the rotary frequencies (a persistent buffer in the reference)
        self.rotary_embed = nn.Cell()
        self.rotary_embed.inv_freq = Parameter(Tensor(rope_inv_freq(config.head_dim, 10000.0)), name="inv_freq",
                                               requires_grad=False)

    def frame_inputs(self, frames, dtype, length=None):
        """Host-side tensors that depend only on the frame count: rotary cos/sin (heads, T,
        head_dim; see `rotation_tables`) and each layer's block mask, so the forward itself is
        pure tensor code (compilable). With `length` the inputs are padded to that many frames
        (see `block_window`; `frames` may be one count per row)."""
        length = length or max(np.atleast_1d(frames))
        inv_freq = self.rotary_embed.inv_freq.asnumpy().astype(np.float32)
        freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
        freqs = np.repeat(freqs, 2, axis=-1)  # interleaved pairs share a frequency
        masks = {}
        for block in self.transformer_blocks:
            key = (block.look_backward, block.look_ahead)
            masks.setdefault(key, block_window(frames, self.block_size, *key, length))
        layer_masks = tuple(masks[(b.look_backward, b.look_ahead)] for b in self.transformer_blocks)
        cos, sin = rotation_tables(np.cos(freqs), np.sin(freqs), self.transformer_blocks[0].heads)
        return Tensor(cos, dtype), Tensor(sin, dtype), layer_masks

    def weights(self):
        """Every weight of a forward given the speaker's `voice` (`run`'s `weights`), flat: the
        input side's (time MLP, codec table, input projection), each block's, the output's
        (see `split_weights`)."""
        embed = self.time_embed.weights() + (self.text_embed.codec_embed.weight, self.input_embed.proj.weight,
                                             self.input_embed.proj.bias)
        blocks = ()
        for block in self.transformer_blocks:
            blocks += block.weights()
        return embed + blocks + (self.norm_out.linear.weight, self.norm_out.linear.bias, self.proj_out.weight,
                                 self.proj_out.bias)

    def conditions(self, condition_vector, speaker_embedding, quantized_code, drop_audio_conditioning=False,
                   drop_code=False, apply_cfg=True, voice=None, weights=None):
        """The forward's `frame_conditions` (see `run`). `voice`, the input embedding's
        `reference_voice`, saves computing it again. `weights`: the input side's of `weights()`
        (default this model's own)."""
        if voice is None:
            voice = self.input_embed.reference_voice(condition_vector, drop_audio_conditioning, apply_cfg)
        table = (self.weights()[:EMBED_WEIGHTS] if weights is None else weights)[4]
        code = codec_embedding(quantized_code, table, self.repeats, False if apply_cfg else drop_code)
        code_uncond = codec_embedding(quantized_code, table, self.repeats, True) if apply_cfg else None
        return frame_conditions(speaker_embedding, code, code_uncond, voice, drop_audio_conditioning, apply_cfg)

    def embed(self, hidden_states, conditions, time_step, apply_cfg=True, weights=None):
        """The blocks' input (B, T, hidden), or (2B, ...) with the unconditioned half, and the
        time embedding. `weights`: the input side's of `weights()` (default this model's own)."""
        weights = self.weights()[:EMBED_WEIGHTS] if weights is None else weights
        time_w1, time_b1, time_w2, time_b2, _, proj_w, proj_b = weights
        b = hidden_states.shape[0]
        if time_step.ndim == 0:
            time_step = ops.tile(time_step.reshape(1), (b,))
        t_emb = timestep_embedding(time_step, (time_w1, time_b1, time_w2, time_b2), self.time_embed.freq_dim)
        x = input_embedding(hidden_states, conditions, proj_w, proj_b, apply_cfg)
        if apply_cfg and b > 1:  # one row of t_emb broadcasts over both halves; B rows must be repeated
            t_emb = ops.cat((t_emb, t_emb), 0)
        return x, t_emb

    def output(self, x, t_emb, weights=None):
        """The last blocks' output -> the velocity (B, T, mel_dim). `weights`: the output's of `weights()`."""
        norm_w, norm_b, proj_w, proj_b = self.weights()[-OUTPUT_WEIGHTS:] if weights is None else weights
        linear = P.linear
        scale, shift = ops.chunk(linear(P.silu(t_emb), norm_w, norm_b), 2, 1)
        return linear(modulated_norm(x, scale, shift, self.kernels.modulated_norm), proj_w, proj_b)

    def run(self, hidden_states, conditions, time_step, cos, sin, masks, apply_cfg=True, weights=None):
        """The forward on prepared frame inputs (see `frame_inputs`) and `conditions` (see
        `conditions`), with `weights` (default this model's own, see `weights()`); Token2Wav compiles
        it whole, or its `embed`, `dit_layer` per block and `output` (see
        Qwen2_5OmniToken2WavModel.velocity)."""
        embed, blocks, output = split_weights(self.weights() if weights is None else weights,
                                              len(self.transformer_blocks))
        x, t_emb = self.embed(hidden_states, conditions, time_step, apply_cfg, embed)
        shape = x.shape
        if self.kernels.attention is not None and self.kernels.modulated_norm is not None:
            # the native kernels take the frames as (B * T, hidden) rows: no reshape around each
            # projection (~40 kernels fewer in the tiny DiT's graph, each built at its first call)
            x = x.reshape(-1, shape[-1])
        for i, block in enumerate(self.transformer_blocks):
            x = dit_layer(x, t_emb, cos, sin, masks[i], blocks[i], block.heads, block.head_dim, self.kernels)
        out = self.output(x, t_emb, output)
        return out if out.ndim == 3 else out.reshape(shape[:2] + (-1,))

    def construct(self, hidden_states, condition_vector, speaker_embedding, quantized_code, time_step,
                  drop_audio_conditioning=False, drop_code=False, apply_cfg=True):
        """hidden_states (B, T, mel) noisy mel; condition_vector (B, T_ref, mel) reference mel;
        speaker_embedding (B, T, enc_emb_dim); quantized_code (B, T / repeats); time_step () or (B,).
        With apply_cfg the batch doubles: conditioned outputs first, unconditioned second."""
        cos, sin, masks = self.frame_inputs(hidden_states.shape[1], hidden_states.dtype)
        conditions = self.conditions(condition_vector, speaker_embedding, quantized_code, drop_audio_conditioning,
                                     drop_code, apply_cfg)
        return self.run(hidden_states, conditions, time_step, cos, sin, masks, apply_cfg)
