"""Token2Wav on codec tokens as they arrive, for streaming speech.

The DiT attends within blocks of `block_size` mel frames, each layer at most a block or two back
and one ahead, so a chunk of mel needs only a bounded window of codes around it: the ODE is
solved on [chunk - past, chunk + future) from the same noise the whole answer would start from,
and only the chunk's frames are kept. The ODE couples frames further than one layer's reach (every
step re-reads its neighbours), so a window's frames differ slightly from the whole answer's; the
context sizes trade that difference against latency (README: figures measured).

The vocoder is a stack of convolutions with a finite reach: given `vocoder_context` mel frames on
each side of the new frames, its output equals what it gives on the whole mel, so chunk joins
need no cross-fade (see vocoder.py). The frames after a chunk are not final yet; by default
(`vocoder_lookahead`) the vocoder takes them from the chunk's own window, which solved them as
its future context, so a chunk plays all its frames as soon as it is solved, and its last
samples differ slightly from what the final frames give (the waveform's join, not the mel).
Without look-ahead it holds back the last `vocoder_context` frames until the next chunk (or the
end) arrives: exact joins, and the first audio waits for a chunk more.
"""
from dataclasses import dataclass

import numpy as np

from .token2wav import OdeRow
from .vocoder import CONTEXT, MAX_WINDOW

MAX_DOUBLINGS = 16  # chunks stop doubling after this many (max_chunk_blocks caps them long before)


@dataclass(frozen=True)
class StreamChunking:
    """Sizes in DiT blocks (24 mel frames = 12 codec tokens = 0.24 s in the released config).
    The first chunk is `chunk_blocks` long, for a short wait; each later one doubles, up to
    `max_chunk_blocks`, for throughput: a chunk repeats `past_blocks + future_blocks` of context,
    so longer chunks solve fewer frames twice. A chunk is ready before the previous one has
    played as long as the Talker outpaces speech (README: "Streaming", figures). The first audio
    waits for `chunk_blocks + future_blocks` blocks of codes; with `vocoder_lookahead` off, for
    a chunk more (the vocoder holds back its context: use chunk_blocks >= 2 then)."""
    chunk_blocks: int = 1  # DiT blocks emitted in the first chunk
    past_blocks: int = 2  # already-emitted context the window repeats before the chunk
    future_blocks: int = 1  # context after the chunk: the codes a chunk waits for
    vocoder_context: int = CONTEXT  # mel frames the vocoder sees on each side of its new frames
    max_chunk_blocks: int = 16  # the size later chunks grow to (<= chunk_blocks: no growth)
    vocoder_lookahead: bool = True  # the vocoder's right context from the window's future frames (see above)

    def blocks(self, n):
        """The length of chunk n (0: the first), in DiT blocks."""
        return max(self.chunk_blocks, min(self.chunk_blocks << min(n, MAX_DOUBLINGS), self.max_chunk_blocks))

    def sizes(self):
        """Every chunk length `blocks` gives, in DiT blocks."""
        return {self.blocks(n) for n in range(MAX_DOUBLINGS + 1)}

    def __post_init__(self):
        if self.chunk_blocks < 1 or self.past_blocks < 0 or self.future_blocks < 0 or self.vocoder_context < 0:
            raise ValueError(f"chunk_blocks must be >= 1 and the contexts >= 0; got {self}")
        if 2 * self.vocoder_context >= MAX_WINDOW:
            raise ValueError(f"vocoder_context must be below {MAX_WINDOW // 2} frames; got {self.vocoder_context}")


class NoiseFrames:
    """The ODE's starting noise, frame by frame: the given array, or standard normal draws from
    `seed` made in order, so frames a..b equal those of one draw of the whole answer."""

    def __init__(self, mel_dim, noise=None, seed=None):
        self.mel_dim = mel_dim
        if noise is None:
            self.frames, self.rng = np.zeros((0, mel_dim), np.float32), np.random.default_rng(seed)
        else:
            self.frames, self.rng = np.asarray(noise, np.float32), None
            if self.frames.ndim != 3 or self.frames.shape[0] != 1 or self.frames.shape[2] != mel_dim:
                raise ValueError(f"noise must be (1, frames, {mel_dim}); got {self.frames.shape}")
            self.frames = self.frames[0]

    def __getitem__(self, span):
        if span.stop > len(self.frames):
            if self.rng is None:
                raise ValueError(f"noise has {len(self.frames)} frames; the answer needs at least {span.stop}")
            more = self.rng.standard_normal((1, span.stop - len(self.frames), self.mel_dim)).astype(np.float32)[0]
            self.frames = np.concatenate([self.frames, more])
        return self.frames[span][None]


@dataclass
class OdeWindow:
    """Mel frames start..end of an answer, from the ODE solved on `row`'s frames from `first` on,
    padded to `length`."""
    start: int
    end: int
    first: int
    row: OdeRow
    length: int


class Token2WavStream:
    """`push(codes)` and `finish()` return the waveform pieces (float32, 24 kHz) that became ready;
    joined, they are the answer's waveform. A driver of several answers (the voice server) gives
    codes with `add` and `end` instead, and makes every stream's pieces at once with `synthesise`."""

    def __init__(self, token2wav, conditioning, reference_mel, chunking=None, num_steps=10, guidance_scale=0.5,
                 sway_coefficient=-1.0, noise=None, seed=None):
        dit = token2wav.code2wav_dit_model
        self.token2wav, self.conditioning, self.reference_mel = token2wav, conditioning, reference_mel
        self.chunking = chunking or StreamChunking()
        self.ode = dict(num_steps=num_steps, guidance_scale=guidance_scale, sway_coefficient=sway_coefficient)
        self.repeats, self.block = dit.repeats, dit.block_size
        self.past, self.future = self.chunking.past_blocks * self.block, self.chunking.future_blocks * self.block
        # the frames a window is padded to (one compiled DiT graph each, per power of two of
        # answers solved together): each chunk size's window with its context, and every whole
        # number of blocks up to the first chunk's window (which has no past: its wait is the
        # user's), so a short answer's or a first window costs about its frames; a window takes
        # the smallest length that holds it
        chunks = self.chunking.sizes()
        first_window = min(chunks) + self.chunking.future_blocks
        self.lengths = sorted({blocks * self.block for blocks in range(1, first_window + 1)} |
                              {self.past + c * self.block + self.future for c in chunks})
        self.chunks = 0  # chunks solved so far
        self.noise = NoiseFrames(dit.mel_dim, noise, seed)
        self.codes = np.zeros(0, np.int64)
        self.mel = np.zeros((0, dit.mel_dim), np.float32)  # final mel frames so far
        self.vocoded = 0  # mel frames already turned into samples
        self.new_chunks = []  # (end, frames after it) per chunk solved since the vocoder last ran
        self.finished = False

    def push(self, codes):
        self.add(codes)
        return self.synthesise()

    def finish(self):
        self.end()
        return self.synthesise()

    def synthesise(self):
        """This stream's `synthesise` alone."""
        pieces, = synthesise([self])
        if isinstance(pieces, Exception):
            raise pieces
        return pieces

    def add(self, codes):
        """More codec tokens (nothing is computed until `synthesise`)."""
        if self.finished:
            raise ValueError("this stream has finished")
        self.codes = np.concatenate([self.codes, self.token2wav.clip_codes(codes)[0]])

    def end(self):
        """No more codes: the last frames need no future context."""
        self.finished = True

    @property
    def drained(self):
        """Ended, and every frame of its codes is in the samples given out."""
        return self.finished and self.vocoded == len(self.codes) * self.repeats

    def windows(self):
        """The ODE windows whose codes are all here and whose frames are not solved yet (the
        windows of one stream are independent: each starts from its own noise frames)."""
        total = len(self.codes) * self.repeats
        windows, start, n = [], len(self.mel), self.chunks
        while start < total:
            chunk = self.chunking.blocks(n) * self.block
            end = min(start + chunk, total)
            if not self.finished and total < end + self.future:
                break
            final = self.finished and total - start <= chunk + self.future
            end = total if final else end  # a short rest joins this window: no window of its own
            first, last = max(0, start - self.past), min(end + self.future, total)
            row = OdeRow(self.codes[first // self.repeats:last // self.repeats], self.noise[first:last][0],
                         self.conditioning, self.token2wav.speaker_voice(self.reference_mel, self.ode["guidance_scale"]))
            length = self.window_length(last - first, final)
            windows.append(OdeWindow(start, end, first, row, length))
            start, n = end, n + 1
        return windows

    def window_length(self, frames, final):
        """The frames a window of `frames` is padded to: the smallest of `lengths` that holds it;
        the answer's final window (its size is whatever is left) may instead take the whole
        answer's size for it (Token2Wav.solved_length) when that is smaller, so the tail does not
        solve up to a long chunk's window of padding."""
        length = next(size for size in self.lengths if size >= frames)
        return min(length, self.token2wav.solved_length(frames)) if final else length

    def take_mel(self, solved):
        """`windows()`'s windows solved, in order: per window its chunk's frames and the frames
        after them (its future context: solved, not final)."""
        for kept, ahead in solved:
            self.mel = np.concatenate([self.mel, kept])
            self.chunks += 1
            self.new_chunks.append((len(self.mel), ahead))

    def vocoder_spans(self):
        """(mel, start, end, context) per vocoder span ready, one per chunk solved since the last
        call. A chunk's frames see `vocoder_context` frames after them: with look-ahead its own
        window's (so a span never depends on whether later chunks were solved in the same call:
        an answer sounds the same alone as among others), else the final ones, the frames still
        lacking them held back until they (or the end) are known."""
        context, spans, start = self.chunking.vocoder_context, [], self.vocoded
        chunks = self.new_chunks + ([(len(self.mel), self.mel[:0])] if self.finished else [])
        self.new_chunks = []
        for end, ahead in chunks:
            if self.finished and end == len(self.mel):  # the answer's end: nothing comes after it
                ahead, upto = ahead[:0], end
            else:
                ahead = ahead[:context] if self.chunking.vocoder_lookahead else ahead[:0]
                upto = end - (context - len(ahead))
            if upto > start:
                spans.append((np.concatenate([self.mel[:end], ahead]), start, upto, context))
                start = upto
        return spans


def synthesise(streams):
    """Everything `streams` (of one Token2Wav) can make now: their ODE windows, those of equal
    length and settings solved as one batch, then their vocoder spans, spans of equal width as
    one batch. Rows are independent, so each stream's pieces are what it makes alone.
    -> per stream, its new waveform pieces (a list: empty or one array), or the ValueError that
    stopped it making its windows (noise too short): the others go on. A failed batch raises."""
    if not streams:
        return []
    token2wav = streams[0].token2wav
    windows, results = {}, {}
    for stream in streams:
        try:
            windows[stream] = stream.windows()
        except ValueError as error:
            results[stream] = error
    groups = {}
    for stream, own in windows.items():
        for window in own:
            groups.setdefault((window.length, *stream.ode.items()), []).append(window)
    solved = {}  # window -> (its chunk's frames, its frames after the chunk)
    for (length, *ode), group in groups.items():
        mels = token2wav.solve_rows([w.row for w in group], length, **dict(ode)).asnumpy()
        solved.update((id(w), (mel[w.start - w.first:w.end - w.first], mel[w.end - w.first:len(w.row.noise)]))
                      for w, mel in zip(group, mels))
    spans = []  # (stream, span) in each stream's order
    for stream, own in windows.items():
        stream.take_mel([solved[id(w)] for w in own])
        spans += [(stream, span) for span in stream.vocoder_spans()]
    pieces = {}
    for (stream, span), samples in zip(spans, token2wav.vocoder.spans([span for _, span in spans])):
        stream.vocoded = span[2]
        pieces.setdefault(stream, []).append(samples)
    results.update((stream, [np.concatenate(own)]) for stream, own in pieces.items())
    return [results.get(stream, []) for stream in streams]
