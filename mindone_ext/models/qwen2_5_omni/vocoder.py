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
        return self.spans([(mel, start, end, context)])[0]

    def spans(self, requests):
        """`span` of several requests (mel, start, end, context) at once (the answers of a voice
        server): their windows of equal width run as one batch. -> samples per request."""
        hop = self.bigvgan.hop
        plans = [self._windows(*request) for request in requests]
        waves = iter(self.windows([mel[first:last] for (mel, *_), plan in zip(requests, plans)
                                   for first, last, _, _ in plan]))
        samples = []
        for plan in plans:
            pieces = [next(waves)[(lo - first) * hop:(hi - first) * hop] for first, _, lo, hi in plan]
            samples.append(np.concatenate(pieces) if pieces else np.zeros(0, np.float32))
        return samples

    def _windows(self, mel, start, end, context):
        """(first, last, lo, hi) per window: frames lo..hi kept from the vocoder on first..last."""
        step = MAX_WINDOW - 2 * context if self.compiled else max(1, end - start)
        return [(max(0, lo - context), min(len(mel), min(end, lo + step) + context), lo, min(end, lo + step))
                for lo in range(start, end, step)]

    def windows(self, mels):
        """BigVGAN on each of `mels` (T, mel_dim) as if it were the whole input -> waveforms.
        Op by op, mels of equal length run as one batch (rows are independent: a row's samples
        are what it gets alone); compiled, each runs through its width's graph."""
        if self.compiled:
            return [self._compiled_window(mel) for mel in mels]
        waves, by_length = [None] * len(mels), {}
        for i, mel in enumerate(mels):
            by_length.setdefault(mel.shape[0], []).append(i)
        for rows in by_length.values():
            batch = np.ascontiguousarray(np.stack([mels[i].T for i in rows]))
            wav = self.bigvgan(Tensor(batch)).asnumpy().reshape(len(rows), -1).astype(np.float32)
            for i, row in zip(rows, wav):
                waves[i] = row
        return waves

    def _compiled_window(self, mel):
        frames, mel_dim = mel.shape
        width = bucket(frames, SMALLEST_WIDTH)
        padded = np.zeros((1, mel_dim, width), np.float32)
        padded[0, :, :frames] = mel.T
        with compiling(None if width in self.widths else f"the vocoder for {width} mel frames"):
            self.widths.add(width)
            wav = self._graph(Tensor(padded), Tensor(frames, ms.int32))
            return wav.asnumpy().reshape(-1)[:frames * self.bigvgan.hop].astype(np.float32)
