"""BigVGAN on a mel of any length, op by op or through a few compiled graphs.

Op by op (the default), the vocoder runs once over the frames asked for. Compiled
(`Vocoder.compiled = True`), it runs as one graph per window width: widths are bucketed
(`bucket`: at most 12.5% padding), the real length is a graph input (BigVGAN's `frames`), and a
mel longer than `MAX_WINDOW` frames is vocoded in windows that overlap by `CONTEXT` frames on
each side. The vocoder is a stack of convolutions with a finite reach, so a window's middle
equals the whole mel's output (tests/models/qwen2_5_omni/test_vocoder.py); MindSpore's CPU backend
keeps each graph's buffers for the life of the process, and windows bound them.

Why compiling is not the default: a graph of the vocoder is ~1500 kernels, which MindSpore 2.7.1
compiles in ~35 s per width on this project's CPU machine, its compile cache can return another
graph's results (README: "Latency"); a window then runs ~2x faster on the bundled tiny
checkpoint, which pays in a long-lived process that vocodes many windows of few widths.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor

from ...generation.decode import bucket
from ...utils.notice import compiling

CONTEXT = 24  # mel frames the vocoder sees on each side of the frames it keeps
MAX_WINDOW = 256  # mel frames per compiled call at most (2.56 s of speech)
SMALLEST_WIDTH = 32


class Vocoder:
    def __init__(self, bigvgan, compiled=False):
        self.bigvgan, self.compiled = bigvgan, compiled
        self.widths = set()  # window widths compiled so far

        @ms.jit
        def graph(mel, frames):
            return bigvgan(mel, frames)

        self._graph = graph

    def __call__(self, mel):
        """mel (T, mel_dim) -> waveform (T * hop,) float32, as BigVGAN on the whole mel."""
        return self.span(mel, 0, len(mel))

    def span(self, mel, start, end, context=CONTEXT):
        """Samples of frames start..end of `mel` (T, mel_dim), the vocoder seeing `context`
        frames on each side of them (fewer at the mel's ends, which are real edges)."""
        step = MAX_WINDOW - 2 * context if self.compiled else max(1, end - start)
        pieces = []
        for lo in range(start, end, step):
            hi = min(end, lo + step)
            first, last = max(0, lo - context), min(len(mel), hi + context)
            wav = self.window(mel[first:last])
            pieces.append(wav[(lo - first) * self.bigvgan.hop:(hi - first) * self.bigvgan.hop])
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)

    def window(self, mel):
        """BigVGAN on `mel` (T, mel_dim) as if it were the whole input."""
        frames, mel_dim = mel.shape
        if not self.compiled:
            return self.bigvgan(Tensor(np.ascontiguousarray(mel.T[None]))).asnumpy().reshape(-1).astype(np.float32)
        width = bucket(frames, SMALLEST_WIDTH)
        padded = np.zeros((1, mel_dim, width), np.float32)
        padded[0, :, :frames] = mel.T
        with compiling(None if width in self.widths else f"the vocoder for {width} mel frames"):
            self.widths.add(width)
            wav = self._graph(Tensor(padded), Tensor(frames, ms.int32))
            return wav.asnumpy().reshape(-1)[:frames * self.bigvgan.hop].astype(np.float32)
