"""BigVGAN on a mel of any length, op by op or through compiled graphs.

Compiled, the vocoder runs in windows planned at one width (`Vocoder.width` frames) that overlap
by `CONTEXT` frames on each side: the vocoder is a stack of convolutions with a finite reach, so a
window's middle equals the whole mel's output (tests/models/qwen2_5_omni/test_vocoder.py). Each
window runs through the narrowest of two graphs that holds it (zero-padded; the real length is a
graph input, BigVGAN's `frames`): `SHORT_WIDTH` frames, or `width`. A graph's time grows with its
width more than with the frames it holds (the tiny checkpoint with native activations: 0.05 s at
48 frames, 0.09 s at 128, 0.14 s at 224, measured), and the windows of a short answer, of a
stream's first chunk and of a chunk's tail are short; a voice server's answers' short windows
run as rows of one call of the short graph (`Vocoder.rows` at most, a graph per power of two: a
call costs mostly its kernels' launches). Each graph is stored once per machine
(utils/graph_cache.py: 6-16 s to compile on this project's CPU machine, ~2 s to load in a later
process) and runs ~5x faster than op by op on the bundled tiny checkpoint (measured with the
activations as ops, 200 frames: 0.6 s against 3.0 s).

MindSpore's CPU backend keeps what a graph allocates for the life of the process: ~46 float32
values per sample entering each of BigVGAN's anti-aliased activations when they run as MindSpore
ops (the released vocoder's graph kept 7.0 GB at 64 frames, the tiny one's 1.05 GB at 224), ~10
when each is one native kernel (bigvgan.py; measured per added frame: 1.26 MB for the tiny one,
19.4 MB for the released one, against 4.0 MB and ~108 MB as ops; with the convolutions fused
into the activations since, the tiny one's graphs keep less: +46 MB for 2 x 48 frames, +62 MB for
8 x 48, +61 MB for 1 x 256, each graph ~40 MB whatever its width). So the short graphs' rows
(`short_rows`) keep at most half of `GRAPH_BYTES` and `width` is the widest whose graph and the
short ones keep at most all of it, by that estimate: two widths and a few row counts, so that
the memory is bounded by construction, and a vocoder too large for any window of at least
`2 * CONTEXT + 32` frames (the released one) runs op by op, as it also does with stored graphs
turned off: once over the frames asked for, equal-length mels of several answers batched.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor

from ...utils.graph_cache import StoredGraph, cache_folder
from ...utils.notice import compiling

CONTEXT = 24  # mel frames the vocoder sees on each side of the frames it keeps
MAX_WINDOW = 256  # mel frames per compiled call at most (2.56 s of speech)
SHORT_WIDTH = 2 * CONTEXT  # the short graph: a stream's first chunk with its context, an answer up to ~1 s
# Short windows of several answers (a voice server's) vocoded in one call, at most this many: a
# call's time is mostly its ~220 kernels' launches (the tiny checkpoint, 48-frame graph: 15.4 ms
# for one window, 35 ms for 4, 59 ms for 8, 105 ms for 16; 10 frames of 48 alone take 13 ms)
MAX_SHORT_ROWS = 8
GRAPH_BYTES = 1 << 30  # what the compiled graphs may keep together (see above)
# float32 values kept per sample entering an activation (measured, see above): as ops, as native kernels
KEPT_VALUES_PER_SAMPLE = 46
KEPT_VALUES_PER_SAMPLE_NATIVE = 11


def kept_bytes_per_frame(bigvgan):
    """Bytes a compiled graph of `bigvgan` keeps per mel frame of its width."""
    samples, values = 1, 0
    for i, rate in enumerate(bigvgan.upsample_rates):
        samples *= rate
        blocks = bigvgan.resblocks[i * bigvgan.num_kernels:(i + 1) * bigvgan.num_kernels]
        channels = bigvgan.ups[i][0].weight.shape[1]
        values += channels * samples * sum(len(block.activations) for block in blocks)
    return values * (KEPT_VALUES_PER_SAMPLE if bigvgan.native is None else KEPT_VALUES_PER_SAMPLE_NATIVE) * 4


def short_rows(bigvgan, budget=GRAPH_BYTES):
    """How many short windows (of several answers) one call of the short graph takes: the most, a
    power of two up to MAX_SHORT_ROWS, whose graphs (one per power of two up to it: SHORT_WIDTH x
    (2 rows - 1) frames in all) keep at most half of `budget`; at least 1."""
    frames = budget // 2 // kept_bytes_per_frame(bigvgan)
    rows = MAX_SHORT_ROWS
    while rows > 1 and SHORT_WIDTH * (2 * rows - 1) > frames:
        rows //= 2
    return rows


def graph_width(bigvgan, budget=GRAPH_BYTES):
    """The widest window (a multiple of 32 frames, at most MAX_WINDOW) whose graph keeps at most
    `budget` bytes beside the short graphs' (`short_rows`), or None when even 2 * CONTEXT + 32
    frames would keep more."""
    short = SHORT_WIDTH * (2 * short_rows(bigvgan, budget) - 1)
    width = min(MAX_WINDOW, (budget // kept_bytes_per_frame(bigvgan) - short) // 32 * 32)
    return width if width >= 2 * CONTEXT + 32 else None


class Vocoder:
    """`compiled`: None for compiled when graphs are stored and a window fits the budget;
    `width`: the width compiled windows are planned at, in frames (default: `graph_width`'s);
    `widths`: the graphs' widths (the short one and `width`); `rows`: the short windows one call of
    the short graph takes (default: `short_rows`'); a window of `width` runs alone."""

    def __init__(self, bigvgan, compiled=None, width=None, rows=None):
        self.bigvgan = bigvgan
        fits = graph_width(bigvgan)
        self.compiled = (cache_folder() is not None and fits is not None) if compiled is None else compiled
        self.width = width or fits or 2 * CONTEXT + 32
        self.widths = tuple(sorted({min(SHORT_WIDTH, self.width), self.width}))
        self.rows = rows or short_rows(bigvgan)
        self.compiled_shapes = set()  # (rows, width) of the graphs run

        def vocode(mel, frames, weights):
            return bigvgan.apply(mel, frames, weights)

        self._graph = StoredGraph("bigvgan", vocode, bigvgan.structure)

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
        """(first, last, lo, hi) per window: frames lo..hi kept from the vocoder on first..last.
        A kept frame sees `context` frames on each side, or the mel's edge: a window that reaches
        the mel's start or end keeps frames up to it (200 frames of the tiny checkpoint's 128-frame
        windows: 2 windows, where keeping only windows' middles took 3)."""
        if not self.compiled:
            return [(max(0, start - context), min(len(mel), end + context), start, end)] if end > start else []
        if self.width - 2 * context < 1:
            raise ValueError(f"a vocoder context of {context} frames leaves nothing of a {self.width}-frame window")
        windows, lo = [], start
        while lo < end:
            first = max(0, lo - context)
            reach = first + self.width
            hi = min(end, len(mel) if reach >= len(mel) else reach - context)
            windows.append((first, min(len(mel), hi + context), lo, hi))
            lo = hi
        return windows

    def windows(self, mels):
        """BigVGAN on each of `mels` (T, mel_dim) as if it were the whole input -> waveforms.
        Rows are independent: a row's samples are what it gets alone. Op by op, mels of equal
        length run as one batch; compiled, each runs through the narrowest graph that holds it,
        up to `rows` short ones in one call."""
        if not mels:  # (a stream asks at every codec token)
            return []
        if self.compiled:
            weights = ms.mutable(self.bigvgan.graph_weights())  # ~300 views: 2.5 ms, made once for the mels
            by_width = {}
            for i, mel in enumerate(mels):
                by_width.setdefault(next(w for w in self.widths if w >= len(mel)), []).append(i)
            waves = [None] * len(mels)
            for width, indices in by_width.items():
                most = self.rows if width == SHORT_WIDTH else 1
                for lo in range(0, len(indices), most):
                    batch = indices[lo:lo + most]
                    for i, wave in zip(batch, self._compiled_windows([mels[i] for i in batch], width, weights)):
                        waves[i] = wave
            return waves
        waves, by_length = [None] * len(mels), {}
        for i, mel in enumerate(mels):
            by_length.setdefault(mel.shape[0], []).append(i)
        for rows in by_length.values():
            batch = np.ascontiguousarray(np.stack([mels[i].T for i in rows]))
            wav = self.bigvgan(Tensor(batch)).asnumpy().reshape(len(rows), -1).astype(np.float32)
            for i, row in zip(rows, wav):
                waves[i] = row
        return waves

    def _compiled_windows(self, mels, width, weights):
        """`mels` through the graph of `width` frames, as rows of one call, zero-padded to the
        width, each with its own frame count; the rows padded to a power of two (copies of the
        last: a few graphs whatever the count; the CPU backend keeps each graph's memory)."""
        count, hop = len(mels), self.bigvgan.hop
        rows = 1 << (count - 1).bit_length()
        mels = mels + mels[-1:] * (rows - count)
        padded = np.zeros((rows, mels[0].shape[1], width), np.float32)
        for row, mel in zip(padded, mels):
            row[:, :len(mel)] = mel.T
        shape = (rows, width)
        note = f"the vocoder for {width} mel frames" + (f" x {rows} rows" if rows > 1 else "")
        with compiling(None if shape in self.compiled_shapes else note):
            self.compiled_shapes.add(shape)
            wav = self._graph(Tensor(padded), Tensor(np.array([len(m) for m in mels], np.int32)), weights)
            wav = wav.asnumpy().reshape(rows, -1)
        return [row[:len(mel) * hop].astype(np.float32) for row, mel in zip(wav, mels[:count])]
