"""The audio encoder (Whisper-style): a conv front end over windows of n_window * 2 mel frames,
transformer layers attending within each window, 2x average pooling and a projection to the
Thinker's width. Names mirror the reference (`thinker.audio_tower.*`).

The layers run on the windows padded to one length (each token attends to the real tokens of its
window). For inference the encoder is three compiled graphs per power of two of windows, each
taking its weights as inputs: the convolutions (`stem`), one layer shared by every layer
(`audio_layer`: op by op, each layer is ~25 dispatches) and the pooling with the projection
(`head`); op by op, these two were ~17% of a loaded voice server's model thread (new shapes each
turn). Training, and layers wrapped by LoRA adapters, run op by op through the cells."""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ...nn import ops as P
from ...nn.attention import attention, use_flash
from ...nn.encoder_kernels import EncoderKernels, act_bias, bias_residual, layer_norm, segment_table
from ...nn.layers import Conv1d, Embedding, LayerNorm, Linear
from ...utils.graph_cache import StoredGraph
from ...utils.notice import compiling


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


def frames_conv(x, weight, taps, stride, padding):
    """torch's conv1d, without its bias, on x laid out (B, frames, C_in), channels last, giving
    (B, frames', C_out): each output frame's taps side by side, then one product with the weight
    given as (C_out, C_in * taps) (the (C_out, C_in, taps) Parameter viewed flat before the graph:
    no copy; on the CPU the native linear runs it). MindSpore's CPU convolutions took the 7B's
    stem on a window 20 ms, the reference's 7 ms."""
    b, frames, channels = x.shape
    out = (frames + 2 * padding - taps) // stride + 1
    if padding:  # zero frames joined on: MindSpore's CPU pad kernel took ~2.5 ms on a 7B window, this ~0.2
        edge = ops.zeros((b, padding, channels), x.dtype)
        x = ops.cat((edge, x, edge), 1)
    columns = ops.stack([x[:, j:j + (out - 1) * stride + 1:stride] for j in range(taps)], -1)  # (B, out, C_in, taps)
    return P.linear(columns.reshape(b, out, -1), weight)


def audio_layer(x, mask, weights, heads, act, flash, act_name=None, kernels=EncoderKernels()):
    """One encoder layer as a pure function of its weights (`AudioEncoderLayer.weights`): x
    (windows, tokens, d), `mask` (windows, 1, tokens, tokens) the real keys of each window, or with
    the native attention (kernels.segment_attention) its real tokens' rows (segment_table; the
    other rows attend nothing). `kernels`: native ones for its element-wise steps and attention
    (`act_name` says which activation `act` is)."""
    ln1_w, ln1_b, q_w, q_b, k_w, v_w, v_b, o_w, o_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b = weights
    linear = P.linear
    s, t, d = x.shape
    h = layer_norm(x, ln1_w, ln1_b, 1e-5, kernels.layer_norm)
    projections = ((q_w, q_b), (k_w, None), (v_w, v_b))
    if kernels.segment_attention is not None:
        q, k, v = (linear(h, w, b).reshape(s * t, heads, d // heads) for w, b in projections)
        scale = Tensor(np.array([(d // heads) ** -0.5], np.float32))
        attended = kernels.segment_attention(q, k, v, mask, scale).reshape(s, t, d)
    else:
        q, k, v = (linear(h, w, b).reshape(s, t, heads, d // heads).swapaxes(1, 2) for w, b in projections)
        attended = attention(q, k, v, mask, (d // heads) ** -0.5, flash)
    x = bias_residual(x, linear(attended, o_w), o_b, kernels.bias_residual)
    h = layer_norm(x, ln2_w, ln2_b, 1e-5, kernels.layer_norm)
    h = act_bias(linear(h, fc1_w), fc1_b, act, act_name, kernels.gelu_bias)
    x = bias_residual(x, linear(h, fc2_w), fc2_b, kernels.bias_residual)
    if x.dtype == ms.float16:  # as the reference: keep fp16 activations finite
        x = ops.clip(x, -64504.0, 64504.0)
    return x


class AudioAttention(nn.Cell):
    def __init__(self, dim, heads, dtype, flash):
        super().__init__()
        self.heads, self.head_dim, self.flash = heads, dim // heads, flash
        self.k_proj = Linear(dim, dim, False, dtype)
        self.v_proj = Linear(dim, dim, True, dtype)
        self.q_proj = Linear(dim, dim, True, dtype)
        self.out_proj = Linear(dim, dim, True, dtype)

    def construct(self, x, mask):
        s, t, _ = x.shape
        q, k, v = (p(x).reshape(s, t, self.heads, self.head_dim).swapaxes(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, mask, self.head_dim**-0.5, self.flash))


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

    def plain(self):
        """Whether every projection is a plain Linear (no adapter wraps it): `weights` is the layer."""
        a = self.self_attn
        return all(type(p) is Linear for p in (a.q_proj, a.k_proj, a.v_proj, a.out_proj, self.fc1, self.fc2))

    def weights(self):
        a, n1, n2 = self.self_attn, self.self_attn_layer_norm, self.final_layer_norm
        return (n1.weight, n1.bias, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.v_proj.weight, a.v_proj.bias,
                a.out_proj.weight, a.out_proj.bias, n2.weight, n2.bias, self.fc1.weight, self.fc1.bias,
                self.fc2.weight, self.fc2.bias)

    def construct(self, x, mask):
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
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
        heads, act = config.encoder_attention_heads, P.activation(config.activation_function)

        def head(x, first, second, ln_w, ln_b, proj_w, proj_b):
            x = x.reshape(-1, x.shape[-1])
            pooled = (ops.gather(x, first, 0) + ops.gather(x, second, 0)) / 2
            return P.linear(P.layer_norm(pooled, ln_w, ln_b, 1e-5), proj_w, proj_b)

        # graphs per power of two of windows, the layer's shared by all layers; stored once per machine
        self._head_graph = StoredGraph("audio_head", head, ())
        self.heads, self.act, self.act_name, self.flash = heads, act, config.activation_function, flash
        self.use_kernels(EncoderKernels.build(dtype))

    def use_kernels(self, kernels):
        """Run the stem and layers with `kernels` (EncoderKernels; tests run the ops alone this way)."""
        heads, act, act_name, flash = self.heads, self.act, self.act_name, self.flash
        self.kernels = kernels
        convs = tuple((conv.weight.shape[-1], conv.stride, conv.padding) for conv in (self.conv1, self.conv2))

        def stem(x, valid, conv1_w, conv1_b, conv2_w, conv2_b, positions):
            # the reference's exact GELU, with each convolution's bias added in its kernel
            x = act_bias(frames_conv(x, conv1_w, *convs[0]), conv1_b, P.gelu, "gelu", kernels.gelu_bias) * valid
            return act_bias(frames_conv(x, conv2_w, *convs[1]), conv2_b, P.gelu, "gelu", kernels.gelu_bias) + positions

        def layer(h, m, w):
            return audio_layer(h, m, w, heads, act, flash, act_name, kernels)

        self._stem_graph = StoredGraph("audio_stem", stem, (convs, kernels.libraries))
        self._layer_graph = StoredGraph("audio_layer", layer, (heads, act_name, flash, kernels.libraries))
        self._windows = set()  # window counts it has run

    def _conv_weights(self):
        """The convolutions' weights as the stem takes them: each (C_out, C_in * taps), a view of
        the Parameter's storage (read by the graph, no copy), then its bias."""
        return tuple(t for conv in (self.conv1, self.conv2)
                     for t in (Tensor(conv.weight).reshape(conv.weight.shape[0], -1), Tensor(conv.bias)))

    def compiled(self):
        """Whether inference runs through the graphs: not training, and no adapter wraps a layer
        (the graphs take the plain layers' weights)."""
        return not self.training and type(self.proj) is Linear and all(layer.plain() for layer in self.layers)

    def construct(self, input_features, feature_lens):
        """input_features (num_mel_bins, total frames): the clips' valid frames one after the other;
        feature_lens (num_clips,). Returns (total audio tokens, output_dim), clip after clip."""
        feature_lens = np.asarray(feature_lens, np.int64)
        flat = np.asarray([n for clip in window_lengths(feature_lens, self.n_window * 2) for n in clip])
        starts = np.concatenate([[0], np.cumsum(flat)[:-1]])
        tokens = after_conv(flat)
        # 2x average pooling within each clip (an odd last token is dropped, as AvgPool1d does):
        # the first token of each pair, counted over the clips' tokens one after the other
        clip_tokens, _ = output_lengths(feature_lens)
        clip_starts = np.concatenate([[0], np.cumsum(clip_tokens)[:-1]])
        first = np.concatenate([s + 2 * np.arange(n // 2) for s, n in zip(clip_starts, clip_tokens)]).astype(np.int32)
        if self.compiled():
            return self._run_graphs(input_features, flat, starts, tokens, first)
        longest = int(flat.max())
        frame_index = np.minimum(starts[:, None] + np.arange(longest)[None, :], int(flat.sum()) - 1)
        frame_valid = np.arange(longest)[None, :] < flat[:, None]
        dtype = self.conv1.weight.dtype
        x = ops.gather(Tensor(input_features, dtype) if not isinstance(input_features, Tensor) else
                       input_features.astype(dtype), Tensor(frame_index.reshape(-1), ms.int32), 1)
        x = x.reshape(x.shape[0], len(flat), longest).swapaxes(0, 1)  # (windows, mel, frames)
        x = x * Tensor(frame_valid[:, None, :], dtype)  # the reference pads windows with zeros
        x = P.gelu(self.conv1(x)) * Tensor(frame_valid[:, None, :], dtype)
        x = P.gelu(self.conv2(x)).swapaxes(1, 2)  # (windows, tokens, d)
        x = x + self.positions[: x.shape[1]].astype(dtype)
        valid = np.arange(x.shape[1])[None, :] < tokens[:, None]
        mask = Tensor(np.broadcast_to(valid[:, None, None, :], (*valid.shape[:1], 1, valid.shape[1],
                                                                 valid.shape[1])).copy())
        for layer in self.layers:
            x = layer(x, mask)
        x = ops.gather(x.reshape(-1, x.shape[-1]), Tensor(np.flatnonzero(valid).astype(np.int32)), 0)
        pooled = (ops.gather(x, Tensor(first), 0) + ops.gather(x, Tensor(first + 1), 0)) / 2
        return self.proj(self.ln_post(pooled))

    def encode_clips(self, clips):
        """Each of `clips` (features (num_mel_bins, frames)) -> its (audio tokens, output_dim)
        embeddings, every clip's windows in one call (windows are encoded apart, so a clip's
        tokens are what it gives alone, to float32 rounding: ~1e-6 measured on the tiny checkpoint)."""
        lengths = [clip.shape[1] for clip in clips]
        out = self(np.concatenate(clips, 1) if len(clips) > 1 else clips[0], lengths)
        bounds = np.cumsum([0] + output_lengths(lengths)[1].tolist()).tolist()
        return [out[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])] if len(clips) > 1 else [out]

    def _run_graphs(self, input_features, flat, starts, tokens, first):
        """construct() through the graphs: every window padded to a whole one's frames and the
        windows to a power of two; padding is zeros before the convolutions, never a key in the
        layers (a window with no real key gets attention's finite floor), and never pooled."""
        windows, frames = len(flat), 2 * self.n_window
        padded, width = 1 << (windows - 1).bit_length(), after_conv(frames)
        features = input_features.asnumpy() if isinstance(input_features, Tensor) else np.asarray(input_features)
        frame_valid = np.zeros((padded, frames), bool)
        frame_valid[:windows] = np.arange(frames)[None, :] < flat[:, None]
        index = np.minimum(starts[:, None] + np.arange(frames)[None, :], len(features[0]) - 1)
        x = np.zeros((padded, frames, features.shape[0]), np.float32)  # channels last (frames_conv)
        x[:windows] = np.where(frame_valid[:windows, :, None], features[:, index].transpose(1, 2, 0), 0)
        token_valid = np.zeros((padded, width), bool)
        token_valid[:windows] = np.arange(width)[None, :] < tokens[:, None]
        if self.kernels.segment_attention is not None:  # each window's real tokens
            mask = segment_table(token_valid.sum(1), starts=np.arange(padded) * width)
        else:
            mask = np.zeros((padded, 1, width, width), bool)
            mask[:, 0] = token_valid[:, None, :]
            mask = Tensor(mask)
        # the pooled pairs as positions among the padded windows' tokens, padded to a fixed count
        at = np.flatnonzero(token_valid).astype(np.int32)
        pairs = np.zeros((2, padded * width // 2), np.int32)
        pairs[:, :len(first)] = at[first], at[first + 1]
        dtype = self.conv1.weight.dtype
        with compiling(None if padded in self._windows else f"the audio encoder for {padded} windows"):
            self._windows.add(padded)
            # Tensor(p): the Parameter's storage, read by the graph (no copy)
            x = self._stem_graph(Tensor(x, dtype), Tensor(frame_valid[:, :, None], dtype), *self._conv_weights(),
                                 self.positions[:width].astype(dtype))
            for layer in self.layers:
                x = self._layer_graph(x, mask, ms.mutable(tuple(Tensor(w) for w in layer.weights())))
            out = self._head_graph(x, Tensor(pairs[0]), Tensor(pairs[1]), Tensor(self.ln_post.weight),
                                   Tensor(self.ln_post.bias), Tensor(self.proj.weight), Tensor(self.proj.bias))
        return out[:len(first)]
