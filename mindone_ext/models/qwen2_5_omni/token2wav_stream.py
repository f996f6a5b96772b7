"""Token2Wav on codec tokens as they arrive, for streaming speech.

The DiT attends within blocks of `block_size` mel frames, each layer at most a block or two back
and one ahead, so a chunk of mel needs only a bounded window of codes around it: the ODE is
solved on [chunk - past, chunk + future) from the same noise the whole answer would start from,
and only the chunk's frames are kept. The ODE couples frames further than one layer's reach (every
step re-reads its neighbours), so a window's frames differ slightly from the whole answer's; the
context sizes trade that difference against latency (README: figures measured).

The vocoder is a stack of convolutions with a finite reach: given `vocoder_context` mel frames on
each side of the new frames, its output equals what it gives on the whole mel, so chunk joins
need no cross-fade (see vocoder.py). It therefore holds back the last `vocoder_context` frames
until the next chunk (or the end) arrives.
"""
from dataclasses import dataclass

import numpy as np

from .vocoder import CONTEXT, MAX_WINDOW


@dataclass(frozen=True)
class StreamChunking:
    """Sizes in DiT blocks (24 mel frames = 12 codec tokens = 0.24 s in the released config).
    The first chunk is `chunk_blocks` long, for a short wait; each later one doubles, up to
    `max_chunk_blocks`, for throughput: a chunk repeats `past_blocks + future_blocks` of context,
    so longer chunks solve fewer frames twice. A chunk is ready before the previous one has
    played as long as the Talker outpaces speech (README: "Streaming", figures)."""
    chunk_blocks: int = 2  # mel frames emitted in the first chunk
    past_blocks: int = 2  # already-emitted context the window repeats before the chunk
    future_blocks: int = 1  # context after the chunk: the codes a chunk waits for
    vocoder_context: int = CONTEXT  # mel frames the vocoder sees on each side of its new frames
    max_chunk_blocks: int = 8  # the size later chunks grow to (<= chunk_blocks: no growth)

    def blocks(self, n):
        """The length of chunk n (0: the first), in DiT blocks."""
        return max(self.chunk_blocks, min(self.chunk_blocks << min(n, 16), self.max_chunk_blocks))

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


class Token2WavStream:
    """`push(codes)` and `finish()` return the waveform pieces (float32, 24 kHz) that became ready;
    joined, they are the answer's waveform."""

    def __init__(self, token2wav, conditioning, reference_mel, chunking=None, num_steps=10, guidance_scale=0.5,
                 sway_coefficient=-1.0, noise=None, seed=None):
        dit = token2wav.code2wav_dit_model
        self.token2wav, self.conditioning, self.reference_mel = token2wav, conditioning, reference_mel
        self.chunking = chunking or StreamChunking()
        self.ode = dict(num_steps=num_steps, guidance_scale=guidance_scale, sway_coefficient=sway_coefficient)
        self.repeats, self.block = dit.repeats, dit.block_size
        self.past, self.future = self.chunking.past_blocks * self.block, self.chunking.future_blocks * self.block
        self.chunks = 0  # chunks solved so far
        self.noise = NoiseFrames(dit.mel_dim, noise, seed)
        self.codes = np.zeros(0, np.int64)
        self.mel = np.zeros((0, dit.mel_dim), np.float32)  # final mel frames so far
        self.vocoded = 0  # mel frames already turned into samples
        self.finished = False

    def push(self, codes):
        if self.finished:
            raise ValueError("this stream has finished")
        self.codes = np.concatenate([self.codes, self.token2wav.clip_codes(codes)[0]])
        return self._advance()

    def finish(self):
        self.finished = True
        return self._advance()

    def _advance(self):
        total = len(self.codes) * self.repeats
        while len(self.mel) < total:
            start, chunk = len(self.mel), self.chunking.blocks(self.chunks) * self.block
            end = min(start + chunk, total)
            if not self.finished and total < end + self.future:
                break
            self.mel = np.concatenate([self.mel, self._solve(start, end, total, chunk)])
            self.chunks += 1
        piece = self._vocode()
        return [piece] if piece.size else []

    def _solve(self, start, end, total, chunk):
        """Mel frames start..end (at most `chunk`) from the ODE on the window around them."""
        first, last = max(0, start - self.past), min(end + self.future, total)
        code = self.codes[first // self.repeats:last // self.repeats][None]
        mel = self.token2wav.solve(code, self.conditioning, self.reference_mel, self.noise[first:last], **self.ode,
                                   length=self.past + chunk + self.future)
        return mel.asnumpy()[0, start - first:end - first]

    def _vocode(self):
        context = self.chunking.vocoder_context
        upto = len(self.mel) if self.finished else len(self.mel) - context
        if upto <= self.vocoded:
            return np.zeros(0, np.float32)
        piece = self.token2wav.vocoder.span(self.mel, self.vocoded, upto, context)
        self.vocoded = upto
        return piece
