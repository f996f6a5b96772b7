"""BigVGAN vocoder: mel (B, 80, T) -> 24 kHz waveform. Transposed-conv upsampling (x240 in all),
multi-receptive-field AMP blocks with snake-beta activations applied at twice the sample rate
through Kaiser-windowed sinc up/down-sampling (anti-aliasing). Names mirror the reference
(`token2wav.code2wav_bigvgan_model.*`).

Every layer also takes `valid`, the number of real samples at its rate, one for all rows or one
per batch row (a tensor in a compiled graph): the input may be longer, and each row's output's
first `valid` samples are what the reference gives on its real samples alone. Zero padding is
made exact by zeroing what lies past `valid` before each convolution, replicate padding by
reading indices clipped to `valid`. One compiled graph of a given width then serves every shorter
mel, and a batch of mels of different lengths (see vocoder.py's `Vocoder`).

Each layer's `apply` computes it from weights given as arguments (`weights()` lists them, flat):
a compiled graph of the vocoder then holds no parameters, so it can be stored and reused by
another process (utils/graph_cache.py) whatever checkpoint that process loads.

On the CPU, each anti-aliased activation runs as one C++ kernel (kernels/anti_aliased_snake.cc,
utils/native_kernels.py) instead of ~20 MindSpore kernels: the same function (within 1e-5), the
vocoder 2-4x faster, and its compiled graph keeps far less memory. There the vocoder also keeps its
rows 4-D, (B, C, 1, n), from its first convolution to its last (the CPU's convolutions are 2-D: no
reshapes around each), and the residual units' biases and sums are added inside the kernels:
a compiled graph of the tiny checkpoint's vocoder has ~220 kernels instead of 479, and a graph's
first call in a process costs about in proportion to its kernels (building them). Convolutions
of up to `NATIVE_CONVOLUTION_CHANNELS` channels run natively too."""
import math
import os
from functools import lru_cache, partial
from typing import Any, NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ...nn import native_linear, ops as P
from ...nn.layers import Conv1d, empty_parameter
from ...utils import native_kernels

KERNEL_SOURCE = native_kernels.source("anti_aliased_snake.cc")  # built against MindSpore's oneDNN


def kaiser_sinc_filter(cutoff, half_width, kernel_size):
    """Low-pass filter taps (kernel_size,), float32, as the reference builds them."""
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = np.kaiser(kernel_size, beta).astype(np.float32)
    t = (np.arange(-half, half) + 0.5) if kernel_size % 2 == 0 else (np.arange(kernel_size) - half)
    taps = 2 * cutoff * window * np.sinc(2 * cutoff * t.astype(np.float32)).astype(np.float32)
    return (taps / taps.sum()).astype(np.float32)


# Same-padded convolutions of at most this many input channels run natively (SameConvolution, or
# fused with the activation before them; kernels/anti_aliased_snake.cc; every one of the tiny
# vocoder's, the released one's last two stages' and its last one): MindSpore's
# convolution keeps an unrolled copy of its input for the graph's life, and the native one, blocks
# of that unrolled through oneDNN's sgemm, is as fast up to here (ms a call over 3840 samples,
# native / MindSpore in a compiled graph: 32 channels x 7 taps 0.62 / 1.05, 64 x 7 1.69 / 1.75, 64 x
# 11 taps dilated 5 2.50 / 2.28; wider, MindSpore's is faster: 128 x 7 4.9 / 4.3, 512 x 3 over 960
# 8.7 / 6.5).
NATIVE_CONVOLUTION_CHANNELS = 64


class SnakeKernels(NamedTuple):
    """The native kernels of the vocoder (float32, CPU): the activation alone; of x + bias; and
    of a residual sum x + y + bias, which it also returns; the residual sum alone; a "same"-padded
    convolution (see Conv1d.apply_rows); and that convolution of the activation, of the biased
    one, and of the residual one (which also returns the sum): the activation stays in the kernel;
    and a whole AMP block of those (`AMPBlock._fused_rows` in one call)."""
    activation: Any
    biased: Any
    residual: Any
    biased_residual: Any
    same_convolution: Any
    activated_convolution: Any
    biased_activated_convolution: Any
    residual_activated_convolution: Any
    amp_block: Any


def _pair(first, *_):
    return [first, first]


def _convolved(x, weight, *_):
    return [x[0], weight[0], 1, x[3]]


def _activated_convolved(x, *inputs):
    return _convolved(x, inputs[-2])


def _residual_convolved(x, *inputs):
    return [x, _convolved(x, inputs[-2])]


def vocoder_library():
    """The path of the built kernels/anti_aliased_snake.cc, or None (MindSpore ops)."""
    return native_linear.onednn_library(os.path.basename(KERNEL_SOURCE))


@lru_cache(maxsize=None)
def snake_kernels(path):
    """The kernels of the built library at `path` (`vocoder_library()`), or None (no library:
    MindSpore ops)."""
    if path is None:
        return None
    op = partial(native_kernels.custom_op, path)
    return SnakeKernels(op("AntiAliasedSnake"), op("BiasedAntiAliasedSnake"),
                        op("ResidualAntiAliasedSnake", _pair, _pair), op("BiasedResidual"),
                        op("SameConvolution", _convolved), op("ActivatedConvolution", _activated_convolved),
                        op("BiasedActivatedConvolution", _activated_convolved),
                        op("ResidualActivatedConvolution", _residual_convolved, _pair), op("AMPBlock"))


def narrow_convolution(kernels, channels):
    """The native convolution for `channels` input channels, or None (MindSpore's)."""
    if kernels is None or channels > NATIVE_CONVOLUTION_CHANNELS:
        return None
    return kernels.same_convolution


def whole_row(x, valid):
    """`valid` as a kernel takes it: None (every sample real) -> the row's length."""
    return ops.scalar_to_tensor(x.shape[-1], ms.int32) if valid is None else valid


def per_row(valid, x):
    """`valid` (one count, or one per batch row of x) shaped to broadcast over x's last axis."""
    return valid.reshape((-1,) + (1,) * (x.ndim - 1))


def keep_valid(x, valid):
    """x with the samples past `valid` (None: all are valid; one count or one per batch row)
    zeroed, as a zero-padded conv expects."""
    if valid is None:
        return x
    return x * (ops.arange(x.shape[-1], dtype=ms.int32) < per_row(valid, x)).astype(x.dtype)


def replicate_pad(x, left, right, valid):
    """torch's replicate padding of the last axis as if it ended after `valid` samples (one count,
    or one per batch row)."""
    if valid is None:
        return P.pad1d(x, left, right, "replicate")
    index = ops.minimum(ops.relu(ops.arange(-left, x.shape[-1] + right, dtype=ms.int32)), per_row(valid, x) - 1)
    if index.shape[0] == 1:  # one count for every row: one index for all
        return ops.gather(x, index.reshape(-1), x.ndim - 1)
    return ops.gather_elements(x, x.ndim - 1, ops.broadcast_to(index, x.shape[:-1] + index.shape[-1:]))


class SnakeBeta(nn.Cell):
    """x + sin^2(x * e^alpha) / (e^beta + 1e-9), per channel."""

    def __init__(self, channels, dtype):
        super().__init__()
        self.alpha = empty_parameter((channels,), dtype, "alpha")
        self.beta = empty_parameter((channels,), dtype, "beta")

    def construct(self, x):
        return snake_beta(x, self.alpha, self.beta)


def snake_beta(x, alpha, beta):
    alpha = ops.exp(alpha).reshape(1, -1, 1)
    beta = ops.exp(beta).reshape(1, -1, 1)
    return x + (1.0 / (beta + 1e-9)) * ops.square(ops.sin(x * alpha))


def polyphase_taps(taps, ratio, crop):
    """The reference upsamples by a transposed convolution (`ratio` * conv_transpose1d with stride
    `ratio`) and crops `crop` samples from the front. Output sample ratio * q + r of that is
    sum_d taps[r + crop - ratio * d] * x[q + d]: `ratio` ordinary filters over the input, one per
    phase, with no zeros stuffed between samples (half the work, a third of the ops).
    Returns (first input offset d_min, filters (ratio, length), already scaled by `ratio`)."""
    k = len(taps)
    spans = [[d for d in range(-k, k + crop) if 0 <= r + crop - ratio * d < k] for r in range(ratio)]
    first, last = min(min(s) for s in spans), max(max(s) for s in spans)
    filters = np.zeros((ratio, last - first + 1), np.float32)
    for r, span in enumerate(spans):
        for d in span:
            filters[r, d - first] = taps[r + crop - ratio * d] * ratio
    return first, filters


class AntiAliasedActivation(nn.Cell):
    """Upsample x2, activate, downsample x2 (the reference's TorchActivation1d, kernels of 12).
    `native`: the path of the built anti_aliased_snake library (float32 only), or None for MindSpore ops."""

    def __init__(self, channels, dtype, native=None, ratio=2, kernel_size=12):
        super().__init__()
        self.act = SnakeBeta(channels, dtype)
        self.channels, self.ratio, self.kernel_size = channels, ratio, kernel_size
        taps = kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size)
        kernels = snake_kernels(native if dtype == ms.float32 else None)
        self.fused = None if kernels is None else kernels.activation
        self.taps = Tensor(taps)
        self.filter = Tensor(np.tile(taps[None, None, :], (channels, 1, 1)))
        up_pad = kernel_size // ratio - 1
        first, phases = polyphase_taps(taps, ratio, up_pad * ratio + (kernel_size - ratio) // 2)
        # the reference pads by up_pad on each side and reads from offset `first` on
        self.up_pad = up_pad - first, up_pad
        self.up_filter = Tensor(np.tile(phases[None, :, None, :], (channels, 1, 1, 1)).reshape(channels * ratio, 1, -1))
        self.down_pad = kernel_size // 2 - int(kernel_size % 2 == 0), kernel_size // 2

    def weights(self):
        return self.act.alpha, self.act.beta

    def construct(self, x, valid=None):
        return self.apply(x, valid, *self.weights())

    def apply(self, x, valid, alpha, beta):
        """The activation of x's first `valid` samples (None: all), zeros after them (what the
        zero-padded convolution after it expects)."""
        if self.fused is not None:
            return self.fused(x, whole_row(x, valid), alpha, beta, self.taps)
        b, c, n = x.shape
        up = P.conv1d(replicate_pad(x, self.up_pad[0], self.up_pad[1], valid), self.up_filter.astype(x.dtype), None,
                      1, 0, 1, self.channels)  # (B, C * ratio, >= n): phase r of channel c at row c * ratio + r
        x = up.reshape(b, c, self.ratio, -1)[..., :n].swapaxes(2, 3).reshape(b, c, n * self.ratio)
        x = snake_beta(x, alpha, beta)
        x = replicate_pad(x, self.down_pad[0], self.down_pad[1], None if valid is None else valid * self.ratio)
        return keep_valid(P.conv1d(x, self.filter.astype(x.dtype), None, self.ratio, 0, 1, self.channels), valid)


class AMPBlock(nn.Cell):
    def __init__(self, channels, kernel_size, dilations, dtype, native=None):
        super().__init__()
        pad = lambda d: (kernel_size * d - d) // 2  # noqa: E731
        self.convs1 = nn.CellList([Conv1d(channels, channels, kernel_size, 1, pad(d), d, dtype=dtype) for d in dilations])
        self.convs2 = nn.CellList([Conv1d(channels, channels, kernel_size, 1, pad(1), 1, dtype=dtype) for _ in dilations])
        self.activations = nn.CellList([AntiAliasedActivation(channels, dtype, native)
                                         for _ in range(2 * len(dilations))])
        self.weight_count = 8 * len(dilations)
        # `apply_rows`'s kernels, each a cell attribute (what a compiled graph can read)
        kernels = snake_kernels(native if dtype == ms.float32 else None) or SnakeKernels(*[None] * 9)
        self.snake, self.biased_snake, self.residual_snake, self.biased_residual = kernels[:4]
        self.convolution = narrow_convolution(kernels, channels)
        # with the native convolution, each runs fused with the activation before it, the block in one call
        fused = kernels[5:] if self.convolution is not None else (None,) * 4
        (self.activated_convolution, self.biased_activated_convolution, self.residual_activated_convolution,
         self.whole_block) = fused
        self.dilations = tuple(Tensor(np.array([conv.dilation], np.int32)) for conv in self.convs1)
        self.all_dilations = Tensor(np.array([conv.dilation for conv in self.convs1], np.int32))
        self.second_dilation = Tensor(np.array([1], np.int32))

    def weights(self):
        """Per dilation: the first activation's 2, the first conv's 2, the second's 2 and 2."""
        out = ()
        for i in range(len(self.convs1)):
            first, second = self.convs1[i], self.convs2[i]
            out += (self.activations[2 * i].weights() + (first.weight, first.bias)
                    + self.activations[2 * i + 1].weights() + (second.weight, second.bias))
        return out

    def construct(self, x, valid=None):
        return self.apply(x, valid, self.weights())

    def apply(self, x, valid, weights):
        for i in range(len(self.convs1)):
            a1, b1, w1, c1, a2, b2, w2, c2 = weights[8 * i:8 * i + 8]
            h = self.convs1[i].apply(self.activations[2 * i].apply(x, valid, a1, b1), w1, c1)
            x = x + self.convs2[i].apply(self.activations[2 * i + 1].apply(h, valid, a2, b2), w2, c2)
        return x

    def apply_rows(self, x, valid, weights):
        """`apply` on rows laid out (B, C, 1, n), through the native kernels (SnakeKernels):
        per dilation the convolutions run without their biases, which the kernels after them add
        (the first's before the second activation; the second's with the residual sum, which also
        feeds the next dilation's first activation): 6 graph kernels a dilation instead of ~13; 2
        with the native convolution, each fused with the activation before it (`_fused_rows`)."""
        taps, valid, last = self.activations[0].taps, whole_row(x, valid), len(self.convs1) - 1
        if self.whole_block is not None:  # `_fused_rows` as one kernel (the same functions in the same order)
            return self.whole_block(x, valid, taps, *weights, self.all_dilations)
        if self.activated_convolution is not None:
            return self._fused_rows(x, valid, weights, taps)
        h = self.snake(x, valid, weights[0], weights[1], taps)
        for i in range(last + 1):
            _, _, w1, c1, a2, b2, w2, c2 = weights[8 * i:8 * i + 8]
            h = self.convs1[i].apply_rows(h, w1, same=self.convolution)
            h = self.convs2[i].apply_rows(self.biased_snake(h, c1, valid, a2, b2, taps), w2, same=self.convolution)
            if i < last:
                x, h = self.residual_snake(x, h, c2, valid, weights[8 * i + 8], weights[8 * i + 9], taps)
            else:
                x = self.biased_residual(x, h, c2)
        return x

    def _fused_rows(self, x, valid, weights, taps):
        """`apply_rows` with each convolution fused with the activation before it: per unit, the
        first convolution of the activation of x (after the first unit: of the last unit's residual
        sum, with its second convolution's bias), the second of the activation of h + bias."""
        second = self.second_dilation
        h = self.activated_convolution(x, valid, weights[0], weights[1], taps, weights[2], self.dilations[0])
        h = self.biased_activated_convolution(h, weights[3], valid, weights[4], weights[5], taps, weights[6], second)
        for i in range(1, len(self.dilations)):
            a1, b1, w1, c1, a2, b2, w2, _ = weights[8 * i:8 * i + 8]
            x, h = self.residual_activated_convolution(x, h, weights[8 * i - 1], valid, a1, b1, taps, w1,
                                                       self.dilations[i])
            h = self.biased_activated_convolution(h, c1, valid, a2, b2, taps, w2, second)
        return self.biased_residual(x, h, weights[-1])


class TransposedConv1d(nn.Cell):
    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dtype):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = empty_parameter((in_channels, out_channels, kernel_size), dtype, "weight")
        self.bias = empty_parameter((out_channels,), dtype, "bias")

    def construct(self, x):
        return self.apply(x, self.weight, self.bias)

    def apply(self, x, weight, bias):
        return P.conv_transpose1d(x, weight, bias, self.stride, self.padding)

    def apply_rows(self, x, weight, bias):
        """On rows laid out (B, C, 1, n) (the CPU's layout, see `Conv1d.apply_rows`)."""
        return ops.bias_add(P.cpu_conv_transpose_rows(x, weight, self.stride, self.padding), bias)


class Qwen2_5OmniToken2WavBigVGANModel(nn.Cell):
    def __init__(self, config, dtype=ms.float32):
        super().__init__()
        c0 = config.upsample_initial_channel
        self.num_kernels = len(config.resblock_kernel_sizes)
        self.upsample_rates = tuple(config.upsample_rates)
        self.hop = int(np.prod(self.upsample_rates))  # samples per mel frame
        # the activations' C++ kernel on the CPU, for float32 (None: MindSpore ops)
        self.native = vocoder_library() if dtype == ms.float32 else None
        self.kernels = snake_kernels(self.native)  # None: the ops, rows (B, C, n)
        # what a compiled graph of this vocoder depends on besides its inputs' shapes
        self.structure = (config.mel_dim, c0, tuple(config.resblock_kernel_sizes),
                          tuple(map(tuple, config.resblock_dilation_sizes)), self.upsample_rates,
                          tuple(config.upsample_kernel_sizes), self.native)
        self.conv_pre = Conv1d(config.mel_dim, c0, 7, 1, 3, dtype=dtype)
        self.ups = nn.CellList([
            nn.CellList([TransposedConv1d(c0 // 2**i, c0 // 2**(i + 1), k, s, (k - s) // 2, dtype)])
            for i, (s, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes))])
        self.resblocks = nn.CellList([
            AMPBlock(c0 // 2**(i + 1), k, d, dtype, self.native) for i in range(len(config.upsample_rates))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)])
        last = c0 // 2**len(config.upsample_rates)
        self.activation_post = AntiAliasedActivation(last, dtype, self.native)
        self.conv_post = Conv1d(last, 1, 7, 1, 3, bias=False, dtype=dtype)
        self.post_convolution = narrow_convolution(self.kernels, last)

    @staticmethod
    def normalise_mel(mel):
        """log-mel -> the [-1, 1] dB scale the vocoder was trained on (amplitude floor -115 dB)."""
        floor = math.exp(-115 / 20.0 * math.log(10))
        db = 20 * ops.log10(ops.clamp(ops.exp(mel), min=floor)) - 20
        return ops.clamp(2 * ((db + 115) / 115) - 1, -1.0, 1.0)

    def weights(self):
        """Every weight `apply` takes, in its order: conv_pre's 2, then per stage the upsampling's 2
        and its AMP blocks', then the last activation's 2 and conv_post's 1."""
        out = (self.conv_pre.weight, self.conv_pre.bias)
        for i, up in enumerate(self.ups):
            out += (up[0].weight, up[0].bias)
            for j in range(self.num_kernels):
                out += self.resblocks[i * self.num_kernels + j].weights()
        return out + self.activation_post.weights() + (self.conv_post.weight,)

    def graph_weights(self):
        """`weights()` as a compiled graph of `apply` takes them: on rows (`kernels` set) each
        convolution's weight with the height of 1 its 2-D kernel reads, (A, B, 1, K), a view of the
        parameter (the graph then reshapes none: a kernel each); each a tensor of the parameter's
        storage (a graph input, not a parameter the graph would hold)."""
        if self.kernels is None:
            return tuple(Tensor(w) for w in self.weights())
        return tuple(w.reshape(w.shape[0], w.shape[1], 1, w.shape[2]) if w.ndim == 3 else Tensor(w)
                     for w in self.weights())

    def construct(self, mel_spectrogram, frames=None):
        return self.apply(mel_spectrogram, frames, self.weights())

    def apply(self, mel_spectrogram, frames, weights):
        """mel (B, mel_dim, T) -> waveform (B * 240 T samples, squeezed), clamped to [-1, 1].
        `frames`: how many of the T frames are real (None: all; one count, or one per row: windows
        of several answers); a row's samples past 240 * its frames are then not the waveform of
        anything. `weights`: as `weights()` lists them."""
        rows = self.kernels is not None  # the CPU's layout (B, C, 1, n), see the module's docstring
        valid = frames
        x = keep_valid(self.normalise_mel(mel_spectrogram), valid)
        if rows:
            x = self.conv_pre.apply_rows(x.expand_dims(2), weights[0], weights[1])
        else:
            x = self.conv_pre.apply(x, weights[0], weights[1])
        at = 2
        for i, up in enumerate(self.ups):
            upsample = up[0].apply_rows if rows else up[0].apply
            x = upsample(keep_valid(x, valid), weights[at], weights[at + 1])
            at += 2
            valid = None if valid is None else valid * self.upsample_rates[i]
            total = None
            for j in range(self.num_kernels):
                block = self.resblocks[i * self.num_kernels + j]
                block_weights = weights[at:at + block.weight_count]
                y = (block.apply_rows if rows else block.apply)(x, valid, block_weights)
                at += block.weight_count
                total = y if total is None else total + y
            x = total / self.num_kernels
        x = self.activation_post.apply(x, valid, weights[at], weights[at + 1])
        if rows:
            x = self.conv_post.apply_rows(x, weights[at + 2], same=self.post_convolution)
        else:
            x = self.conv_post.apply(x, weights[at + 2], None)
        return ops.clamp(x, -1.0, 1.0).squeeze()
