"""Streaming output: text and speech of one answer as they are produced.

The Thinker and the Talker run in lockstep, as Qwen2.5-Omni was designed: the Talker's decode
step n reads the Thinker's answer token n + 1 (its hidden state and embedding), so after each
Thinker token the Talker takes one step. Codec tokens go to a Token2WavStream, whose chunks are
yielded as soon as the DiT window around them is complete.
"""
from dataclasses import dataclass

import mindspore as ms

from .token2wav_stream import Token2WavStream

SAMPLE_RATE = 24000


@dataclass
class TextDelta:
    """One Thinker token: its id and the text it completes (empty while a UTF-8 character is
    split across tokens, or without a tokenizer)."""
    token_id: int
    text: str


@dataclass
class AudioChunk:
    """Waveform samples that follow the previous chunk's: a float32 mindspore.Tensor (samples,)
    in [-1, 1] at 24 kHz (`np.asarray(chunk.audio)` for numpy)."""
    audio: ms.Tensor
    sample_rate: int = SAMPLE_RATE


class TextDecoder:
    """Token ids -> newly completed text. Byte-level BPE can split a character over tokens; text
    ending in U+FFFD (an incomplete character) is held back until the next token completes it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token_id, final=False):
        if self.tokenizer is None:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


def stream_answer(model, plan, tokenizer, chunking, cache=None, record=None):
    """Yields TextDelta and AudioChunk events for one conversation (see
    Qwen2_5OmniForConditionalGeneration.generate_stream). Closing the generator stops the
    Thinker and the Talker and frees their caches. A `cache` passed in already holds the prompt
    and stays open (the session that owns it continues the conversation); `record` (a list)
    receives the Thinker's steps."""
    own_cache = cache is None
    if own_cache:
        cache = plan.runner.allocate(1, plan.ids.shape[1] + plan.max_new, plan.cache_dtype)
    else:
        plan.runner.reserve(cache, cache.length + plan.max_new)
    thinker = model._thinker_steps(plan, cache)
    text = TextDecoder(tokenizer)
    speech = _Speech(model, plan, chunking) if plan.return_audio else None
    try:
        for step_index, step in enumerate(thinker):
            token = int(step[0][0])
            if record is not None:
                record.append(step)
            final = step_index == plan.max_new - 1 or token in plan.eos
            yield TextDelta(token, text.push(token, final))
            if speech is not None:
                yield from speech.after_thinker_step(step)
        if own_cache:
            cache.release()  # the Thinker is done; the Talker may still have a while to go
        if speech is not None:
            yield from speech.finish()
    finally:
        thinker.close()
        if own_cache:
            cache.release()
        if speech is not None:
            speech.close()


class _Speech:
    """The Talker fed one answer token at a time, and Token2Wav fed its codec tokens."""

    def __init__(self, model, plan, chunking):
        self.model, self.plan = model, plan
        self.first_steps = []
        self.prompt = self.codes = None
        self.calls = 0  # codec tokens asked for so far
        self.held = None  # the newest codec token: the answer's last one (a stop token) is dropped
        voice = plan.voice
        self.wave = Token2WavStream(model.token2wav, voice.cond, voice.ref_mel, chunking, seed=plan.seed,
                                    **plan.token2wav_args)

    def after_thinker_step(self, step):
        if self.prompt is None:
            self.first_steps.append(step)
            if len(self.first_steps) < 2:  # the Talker's prompt ends with the first answer token's state
                return
            self.prompt = self.model._talker_prompt(self.plan, *self.first_steps)
            self.codes = self.model._talker_codes(self.plan, self.prompt)
        else:
            self.prompt.add_reply(step[1], step[2])
        yield from self._talk()

    def finish(self):
        if self.prompt is not None:
            self.prompt.finish()
            yield from self._talk()
        yield from self._audio(self.wave.finish())

    def _talk(self):
        """Codec tokens while the Talker's next input is known."""
        while self.calls == 0 or self.prompt.ready(self.calls - 1):
            code = next(self.codes, None)
            if code is None:
                return
            self.calls += 1
            if self.held is not None:
                yield from self._audio(self.wave.push([self.held]))
            self.held = code

    @staticmethod
    def _audio(pieces):
        for piece in pieces:
            yield AudioChunk(ms.Tensor(piece))

    def close(self):
        if self.codes is not None:
            self.codes.close()
