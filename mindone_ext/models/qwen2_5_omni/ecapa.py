"""ECAPA-TDNN speaker encoder: the DiT's condition on a reference mel spectrogram (TDNN blocks,
SE-Res2Net blocks, multi-layer aggregation, attentive statistics pooling). Names mirror the
reference (`token2wav.code2wav_dit_model.input_embed.spk_encoder.*`).

Every block computes `apply(x, weights)` from its weights given as a flat tuple (`weights()`, each
convolution's weight and bias in order), so the whole encoder runs as one stored graph (`encode`:
utils/graph_cache.py, compiled once per machine; op by op its first call in a process took ~0.2 s
on the tiny checkpoint, each op compiling its kernel)."""
import mindspore as ms
from mindspore import nn, ops

from ...nn import ops as P
from ...nn.layers import Conv1d
from ...utils.graph_cache import StoredGraph


class SameConv1d(Conv1d):
    """Conv1d with 'same' output length through reflect padding (torch padding="same",
    padding_mode="reflect")."""

    def __init__(self, in_channels, out_channels, kernel_size, dilation=1, dtype=ms.float32):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation, dtype=dtype)
        total = dilation * (kernel_size - 1)
        self.left, self.right = total // 2, total - total // 2

    def weights(self):
        return self.weight, self.bias

    def apply(self, x, weight, bias):
        if self.left or self.right:
            x = P.pad1d(x, self.left, self.right, "reflect")
        return P.conv1d(x, weight, bias, 1, 0, self.dilation)


class TimeDelayNetBlock(nn.Cell):
    def __init__(self, in_channels, out_channels, kernel_size, dilation, dtype):
        super().__init__()
        self.conv = SameConv1d(in_channels, out_channels, kernel_size, dilation, dtype)

    def weights(self):
        return self.conv.weights()

    def construct(self, x):
        return self.apply(x, self.weights())

    def apply(self, x, weights):
        return ops.relu(self.conv.apply(x, *weights))


class Res2NetBlock(nn.Cell):
    def __init__(self, in_channels, out_channels, scale, kernel_size, dilation, dtype):
        super().__init__()
        self.scale = scale
        self.blocks = nn.CellList([TimeDelayNetBlock(in_channels // scale, out_channels // scale, kernel_size, dilation,
                                                     dtype) for _ in range(scale - 1)])

    def weights(self):
        return sum((block.weights() for block in self.blocks), ())

    def construct(self, x):
        return self.apply(x, self.weights())

    def apply(self, x, weights):
        parts = ops.chunk(x, self.scale, 1)
        outputs = [parts[0]]
        for i in range(1, self.scale):
            outputs.append(self.blocks[i - 1].apply(parts[i] if i == 1 else parts[i] + outputs[-1],
                                                    weights[2 * i - 2:2 * i]))
        return ops.cat(outputs, 1)


class SqueezeExcitationBlock(nn.Cell):
    def __init__(self, in_channels, se_channels, out_channels, dtype):
        super().__init__()
        self.conv1 = SameConv1d(in_channels, se_channels, 1, dtype=dtype)
        self.conv2 = SameConv1d(se_channels, out_channels, 1, dtype=dtype)

    def weights(self):
        return self.conv1.weights() + self.conv2.weights()

    def construct(self, x):
        return self.apply(x, self.weights())

    def apply(self, x, weights):
        squeezed = ops.relu(self.conv1.apply(x.mean(2, keep_dims=True), weights[0], weights[1]))
        return x * ops.sigmoid(self.conv2.apply(squeezed, weights[2], weights[3]))


class SqueezeExcitationRes2NetBlock(nn.Cell):
    def __init__(self, in_channels, out_channels, scale, se_channels, kernel_size, dilation, dtype):
        super().__init__()
        self.tdnn1 = TimeDelayNetBlock(in_channels, out_channels, 1, 1, dtype)
        self.res2net_block = Res2NetBlock(out_channels, out_channels, scale, kernel_size, dilation, dtype)
        self.tdnn2 = TimeDelayNetBlock(out_channels, out_channels, 1, 1, dtype)
        self.se_block = SqueezeExcitationBlock(out_channels, se_channels, out_channels, dtype)

    def weights(self):
        return (self.tdnn1.weights() + self.res2net_block.weights() + self.tdnn2.weights()
                + self.se_block.weights())

    def construct(self, x):
        return self.apply(x, self.weights())

    def apply(self, x, weights):
        middle = 2 + 2 * len(self.res2net_block.blocks)  # where tdnn2's weights start
        h = self.res2net_block.apply(self.tdnn1.apply(x, weights[:2]), weights[2:middle])
        return x + self.se_block.apply(self.tdnn2.apply(h, weights[middle:middle + 2]), weights[middle + 2:])


class AttentiveStatisticsPooling(nn.Cell):
    eps = 1e-12

    def __init__(self, channels, attention_channels, dtype):
        super().__init__()
        self.tdnn = TimeDelayNetBlock(channels * 3, attention_channels, 1, 1, dtype)
        self.conv = SameConv1d(attention_channels, channels, 1, dtype=dtype)

    def statistics(self, x, weights):
        mean = (weights * x).sum(2)
        std = ops.sqrt(ops.clamp((weights * (x - mean.expand_dims(2)) ** 2).sum(2), min=self.eps))
        return mean, std

    def weights(self):
        return self.tdnn.weights() + self.conv.weights()

    def construct(self, x):
        return self.apply(x, self.weights())

    def apply(self, x, weights):
        t = x.shape[-1]
        uniform = ops.ones((x.shape[0], 1, t), x.dtype) / t  # every frame is valid: equal weights
        mean, std = self.statistics(x, uniform)
        context = ops.cat((x, ops.tile(mean.expand_dims(2), (1, 1, t)), ops.tile(std.expand_dims(2), (1, 1, t))), 1)
        scores = self.conv.apply(ops.tanh(self.tdnn.apply(context, weights[:2])), weights[2], weights[3])
        attention = ops.softmax(scores, 2)
        mean, std = self.statistics(x, attention)
        return ops.cat((mean, std), 1).expand_dims(2)


class ECAPA_TimeDelayNet(nn.Cell):
    def __init__(self, config, dtype=ms.float32):
        super().__init__()
        c, k, d = config.enc_channels, config.enc_kernel_sizes, config.enc_dilations
        if not len(c) == len(k) == len(d):
            raise ValueError("enc_channels, enc_kernel_sizes and enc_dilations should have same length")
        blocks = [TimeDelayNetBlock(config.mel_dim, c[0], k[0], d[0], dtype)]
        blocks += [SqueezeExcitationRes2NetBlock(c[i - 1], c[i], config.enc_res2net_scale, config.enc_se_channels, k[i],
                                                 d[i], dtype) for i in range(1, len(c) - 1)]
        self.blocks = nn.CellList(blocks)
        self.mfa = TimeDelayNetBlock(c[-1], c[-1], k[-1], d[-1], dtype)
        self.asp = AttentiveStatisticsPooling(c[-1], config.enc_attention_channels, dtype)
        self.fc = SameConv1d(c[-1] * 2, config.enc_dim, 1, dtype=dtype)
        # where each block's weights start in `weights()`, then the mfa's, the pooling's and fc's
        self.bounds = [0]
        for block in self.blocks:
            self.bounds.append(self.bounds[-1] + len(block.weights()))

        def encode(mel, weights):
            return self.apply(mel, weights)

        self._graph = StoredGraph("ecapa", encode, (config.mel_dim, tuple(c), tuple(k), tuple(d),
                                                    config.enc_res2net_scale, config.enc_dim))

    def weights(self):
        blocks = sum((block.weights() for block in self.blocks), ())
        return blocks + self.mfa.weights() + self.asp.weights() + self.fc.weights()

    def construct(self, mel):
        """mel (B, T, mel_dim) -> speaker vector (B, enc_dim), op by op."""
        return self.apply(mel, self.weights())

    def encode(self, mel):
        """`construct` as one stored graph (a new mel shape compiles one; the weights are its inputs)."""
        return self._graph(mel, self.weights())

    def apply(self, mel, weights):
        x = mel.swapaxes(1, 2)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block.apply(x, weights[self.bounds[i]:self.bounds[i + 1]])
            outputs.append(x)
        at = self.bounds[-1]
        x = self.mfa.apply(ops.cat(outputs[1:], 1), weights[at:at + 2])
        return self.fc.apply(self.asp.apply(x, weights[at + 2:at + 6]), weights[at + 6], weights[at + 7]).squeeze(-1)
