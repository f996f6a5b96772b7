"""ECAPA-TDNN speaker encoder: the DiT's condition on a reference mel spectrogram (TDNN blocks,
SE-Res2Net blocks, multi-layer aggregation, attentive statistics pooling). Names mirror the
reference (`token2wav.code2wav_dit_model.input_embed.spk_encoder.*`)."""
import mindspore as ms
from mindspore import nn, ops

from ...nn import ops as P
from ...nn.layers import Conv1d


class SameConv1d(Conv1d):
    """Conv1d with 'same' output length through reflect padding (torch padding="same",
    padding_mode="reflect")."""

    def __init__(self, in_channels, out_channels, kernel_size, dilation=1, dtype=ms.float32):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation, dtype=dtype)
        total = dilation * (kernel_size - 1)
        self.left, self.right = total // 2, total - total // 2

    def construct(self, x):
        if self.left or self.right:
            x = P.pad1d(x, self.left, self.right, "reflect")
        return P.conv1d(x, self.weight, self.bias, 1, 0, self.dilation)


class TimeDelayNetBlock(nn.Cell):
    def __init__(self, in_channels, out_channels, kernel_size, dilation, dtype):
        super().__init__()
        self.conv = SameConv1d(in_channels, out_channels, kernel_size, dilation, dtype)

    def construct(self, x):
        return ops.relu(self.conv(x))


class Res2NetBlock(nn.Cell):
    def __init__(self, in_channels, out_channels, scale, kernel_size, dilation, dtype):
        super().__init__()
        self.scale = scale
        self.blocks = nn.CellList([TimeDelayNetBlock(in_channels // scale, out_channels // scale, kernel_size, dilation,
                                                     dtype) for _ in range(scale - 1)])

    def construct(self, x):
        parts = ops.chunk(x, self.scale, 1)
        outputs = [parts[0]]
        for i in range(1, self.scale):
            outputs.append(self.blocks[i - 1](parts[i] if i == 1 else parts[i] + outputs[-1]))
        return ops.cat(outputs, 1)


class SqueezeExcitationBlock(nn.Cell):
    def __init__(self, in_channels, se_channels, out_channels, dtype):
        super().__init__()
        self.conv1 = SameConv1d(in_channels, se_channels, 1, dtype=dtype)
        self.conv2 = SameConv1d(se_channels, out_channels, 1, dtype=dtype)

    def construct(self, x):
        gate = ops.sigmoid(self.conv2(ops.relu(self.conv1(x.mean(2, keep_dims=True)))))
        return x * gate


class SqueezeExcitationRes2NetBlock(nn.Cell):
    def __init__(self, in_channels, out_channels, scale, se_channels, kernel_size, dilation, dtype):
        super().__init__()
        self.tdnn1 = TimeDelayNetBlock(in_channels, out_channels, 1, 1, dtype)
        self.res2net_block = Res2NetBlock(out_channels, out_channels, scale, kernel_size, dilation, dtype)
        self.tdnn2 = TimeDelayNetBlock(out_channels, out_channels, 1, 1, dtype)
        self.se_block = SqueezeExcitationBlock(out_channels, se_channels, out_channels, dtype)

    def construct(self, x):
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


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

    def construct(self, x):
        t = x.shape[-1]
        uniform = ops.ones((x.shape[0], 1, t), x.dtype) / t  # every frame is valid: equal weights
        mean, std = self.statistics(x, uniform)
        context = ops.cat((x, ops.tile(mean.expand_dims(2), (1, 1, t)), ops.tile(std.expand_dims(2), (1, 1, t))), 1)
        attention = ops.softmax(self.conv(ops.tanh(self.tdnn(context))), 2)
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

    def construct(self, mel):
        """mel (B, T, mel_dim) -> speaker vector (B, enc_dim)."""
        x = mel.swapaxes(1, 2)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        x = self.mfa(ops.cat(outputs[1:], 1))
        return self.fc(self.asp(x)).squeeze(-1)
