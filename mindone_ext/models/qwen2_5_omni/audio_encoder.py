"""The audio encoder (Whisper-style): a conv front end over windows of n_window * 2 mel frames,
transformer layers attending within each window, 2x average pooling and a projection to the
Thinker's width. Names mirror the reference (`thinker.audio_tower.*`)."""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ...nn import ops as P
from ...nn.attention import SegmentLayout, segmented_attention, use_flash
from ...nn.layers import Conv1d, Embedding, LayerNorm, Linear


def sinusoid_table(length, channels, max_timescale=10000):
    # float32 arithmetic, as the reference builds its (non-persistent) buffer
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp((-increment * np.arange(channels // 2, dtype=np.float32)).astype(np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], 1).astype(np.float32)


def window_lengths(feature_lens, window):
    """Per audio, its mel frames cut into windows of `window` frames (the last may be shorter)."""
    lengths = []
    for n in feature_lens:
        lengths.append([window] * (int(n) // window) + ([int(n) % window] if n % window else []))
    return lengths


def after_conv(n):
    return (n - 1) // 2 + 1


def output_lengths(feature_lens):
    """Frames -> (tokens after the stride-2 conv, tokens after pooling), as the reference."""
    cnn = after_conv(np.asarray(feature_lens, np.int64))
    return cnn, (cnn - 2) // 2 + 1


class AudioAttention(nn.Cell):
    def __init__(self, dim, heads, dtype, flash):
        super().__init__()
        self.heads, self.head_dim, self.flash = heads, dim // heads, flash
        self.k_proj = Linear(dim, dim, False, dtype)
        self.v_proj = Linear(dim, dim, True, dtype)
        self.q_proj = Linear(dim, dim, True, dtype)
        self.out_proj = Linear(dim, dim, True, dtype)

    def construct(self, x, layout):
        n = x.shape[0]
        q, k, v = (p(x).reshape(n, self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(segmented_attention(q, k, v, layout, self.head_dim**-0.5, self.flash))


class AudioEncoderLayer(nn.Cell):
    def __init__(self, config, dtype, flash):
        super().__init__()
        d = config.d_model
        self.self_attn = AudioAttention(d, config.encoder_attention_heads, dtype, flash)
        self.self_attn_layer_norm = LayerNorm(d, 1e-5, dtype)
        self.fc1 = Linear(d, config.encoder_ffn_dim, True, dtype)
        self.fc2 = Linear(config.encoder_ffn_dim, d, True, dtype)
        self.final_layer_norm = LayerNorm(d, 1e-5, dtype)
        self.act = P.activation(config.activation_function)

    def construct(self, x, layout):
        x = x + self.self_attn(self.self_attn_layer_norm(x), layout)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        if x.dtype == ms.float16:  # as the reference: keep fp16 activations finite
            x = ops.clip(x, -64504.0, 64504.0)
        return x


class Qwen2_5OmniAudioEncoder(nn.Cell):
    def __init__(self, config, dtype=ms.float32, attn_implementation="eager"):
        super().__init__()
        d = config.d_model
        self.n_window = config.n_window
        self.conv1 = Conv1d(config.num_mel_bins, d, 3, padding=1, dtype=dtype)
        self.conv2 = Conv1d(d, d, 3, stride=2, padding=1, dtype=dtype)
        self.positions = Tensor(sinusoid_table(config.max_source_positions, d))
        self.audio_bos_eos_token = Embedding(2, config.output_dim, dtype)
        flash = use_flash(attn_implementation, dtype, d // config.encoder_attention_heads)
        self.layers = nn.CellList([AudioEncoderLayer(config, dtype, flash) for _ in range(config.encoder_layers)])
        self.ln_post = LayerNorm(d, 1e-5, dtype)
        self.proj = Linear(d, config.output_dim, True, dtype)

    def construct(self, input_features, feature_lens):
        """input_features (num_mel_bins, total frames): the clips' valid frames one after the other;
        feature_lens (num_clips,). Returns (total audio tokens, output_dim), clip after clip."""
        feature_lens = np.asarray(feature_lens, np.int64)
        windows = window_lengths(feature_lens, self.n_window * 2)
        flat = [n for clip in windows for n in clip]
        longest = max(flat)
        starts = np.concatenate([[0], np.cumsum(flat)[:-1]])
        frame_index = np.minimum(starts[:, None] + np.arange(longest)[None, :], sum(flat) - 1)
        frame_valid = np.arange(longest)[None, :] < np.asarray(flat)[:, None]
        dtype = self.conv1.weight.dtype
        x = ops.gather(Tensor(input_features, dtype) if not isinstance(input_features, Tensor) else
                       input_features.astype(dtype), Tensor(frame_index.reshape(-1), ms.int32), 1)
        x = x.reshape(x.shape[0], len(flat), longest).swapaxes(0, 1)  # (windows, mel, frames)
        x = x * Tensor(frame_valid[:, None, :], dtype)  # the reference pads windows with zeros
        x = P.gelu(self.conv1(x)) * Tensor(frame_valid[:, None, :], dtype)
        x = P.gelu(self.conv2(x)).swapaxes(1, 2)  # (windows, tokens, d)
        x = x + self.positions[: x.shape[1]].astype(dtype)
        tokens = after_conv(np.asarray(flat))
        valid = np.arange(x.shape[1])[None, :] < tokens[:, None]
        x = ops.gather(x.reshape(-1, x.shape[-1]), Tensor(np.flatnonzero(valid).astype(np.int32)), 0)
        layout = SegmentLayout(tokens)
        for layer in self.layers:
            x = layer(x, layout)
        # 2x average pooling within each clip (an odd last token is dropped, as AvgPool1d does)
        clip_tokens, _ = output_lengths(feature_lens)
        clip_starts = np.concatenate([[0], np.cumsum(clip_tokens)[:-1]])
        first = np.concatenate([s + 2 * np.arange(n // 2) for s, n in zip(clip_starts, clip_tokens)]).astype(np.int32)
        pooled = (ops.gather(x, Tensor(first), 0) + ops.gather(x, Tensor(first + 1), 0)) / 2
        return self.proj(self.ln_post(pooled))
