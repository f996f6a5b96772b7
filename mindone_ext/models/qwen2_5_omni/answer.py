"""One answer as an explicit pipeline: the Thinker's tokens, the Talker's codec tokens in lockstep
with them, and Token2Wav's audio chunks.

Qwen2.5-Omni's Talker step n reads the Thinker's answer token n + 1 (its hidden state and
embedding), so the two advance together. An `Answer` advances in rounds: `pending()` lists the
decode steps it needs next (the Thinker's next token and, when its input is known, the Talker's
next codec token); whoever drives it runs them and hands the logits back to `advance`, which returns
the events they produced (`TextDelta`). The codec tokens go to the answer's `wave` (a
Token2WavStream); the driver then makes its audio with `token2wav_stream.synthesise` and hands the
pieces to `audio`, which returns the `AudioChunk`s. Alone (`stream`), each step runs by itself; the
voice server runs the decode steps, ODE windows and vocoder spans of many answers as batches.
Prefills run inside `start` (or as `start_steps`' requests, for a driver that runs them) and `advance`.
"""
from dataclasses import dataclass, field

import mindspore as ms
import numpy as np

from ...generation import SamplingConfig
from ...generation.decode import prompt_parts
from .prefills import prefill_now
from .streaming import AudioChunk, TextDecoder, TextDelta
from .token2wav_stream import Token2WavStream


@dataclass
class AnswerRequest:
    """generate()'s arguments checked and sorted: what the Thinker, Talker and Token2Wav get."""
    ids: np.ndarray  # (B, T) prompt token ids
    mask: np.ndarray  # (B, T) int32, 0 on left padding
    prompt: object  # the Thinker's prepared inputs (inputs_embeds, position_ids, rope_deltas[, prefilled])
    media: dict  # the processor's media arrays given (the Talker needs where media was and its lengths)
    max_new: int  # Thinker tokens at most
    sampling: SamplingConfig
    eos: list  # the Thinker's stop tokens
    pad: int
    return_audio: bool
    voice: object = None  # the speaker (with return_audio)
    seed: object = None
    use_audio_in_video: bool = False
    talker_args: dict = field(default_factory=dict)  # talker_* arguments, prefix removed
    token2wav_args: dict = field(default_factory=dict)  # token2wav_* arguments, prefix removed

    @property
    def prefilled(self):
        """(logits, hidden) when the prompt is already in the cache (a conversation), else None."""
        return getattr(self.prompt, "prefilled", None)


class Answer:
    """One conversation's answer (batch size 1). A `cache` passed in already holds the prompt and
    stays open (the session that owns it continues the conversation); otherwise one is allocated
    and freed; so with `talker_cache` (a speech.KeptTalkerCache) for the Talker's. `record` (a
    list) receives the Thinker's steps. Call `close()` at the end, also after an error or to stop
    early: it stops the Talker and frees the caches."""

    def __init__(self, model, request, tokenizer=None, chunking=None, cache=None, record=None, talker_cache=None):
        self.request = request
        runner = model.thinker_runner()
        self.own_cache = cache is None
        if self.own_cache:
            cache = runner.allocate(1, request.ids.shape[1] + request.max_new, model.cache_dtype)
        else:
            runner.reserve(cache, cache.length + request.max_new)
        self.cache = cache
        self.thinker = model.thinker_loop(request, cache)
        self.text = TextDecoder(tokenizer)
        self.record = record
        self.speech = _Speech(model, request, chunking, talker_cache) if request.return_audio else None
        self.done = False  # the last event was produced
        # called once by close(error): a conversation keeps the answer (its prefills, yielded) or drops it
        self.on_close = None
        self.closed = False

    def start(self):
        """Prefill (unless the prompt is in the cache already) and the first token's events."""
        return prefill_now(self.start_steps())

    def start_steps(self):
        """`start` as a generator of the prompt's media in parts (EncodeRequests, sent back their
        embeddings) and its prefill, an ExtendRequest per part of at most PREFILL_CHUNK tokens
        (sent back (logits, hidden)): a driver runs other answers' steps between them. Returns
        the first token's events."""
        prompt, request = self.request.prompt, self.request
        yield from prompt.encode_steps()
        if request.prefilled:
            logits, hidden = request.prefilled
        elif not np.all(request.mask):  # left padding: a prefill of its own
            logits, hidden = self.thinker.runner.prefill(self.cache, prompt.inputs_embeds, prompt.position_ids,
                                                         request.mask)
        else:
            logits, hidden = yield from prompt_parts(self.cache, prompt.inputs_embeds, prompt.position_ids)
        return self._settle(self._after_thinker(self.thinker.first(logits, hidden, prompt.inputs_embeds)))

    def speech_start_steps(self):
        """The Talker's prompt prefill, once the Thinker's first two tokens are known (after the
        `advance` that gave the second; else nothing): a generator of ExtendRequests, each sent back
        (logits, hidden), for the driver to run after `advance` (`stream` runs it at once, the voice
        server between rounds); the Talker's steps are in `pending()` from its end on."""
        return () if self.speech is None else self.speech.start_steps()

    def pending(self):
        """The decode steps this answer needs next (DecodeRequests; empty when it is done)."""
        needed = [] if self.thinker.done else [self.thinker.request()]
        talker = self.speech.request() if self.speech is not None else None
        return needed + ([talker] if talker is not None else [])

    @property
    def wave(self):
        """The answer's Token2WavStream (None without audio): its codes so far, the audio to make."""
        return None if self.speech is None else self.speech.wave

    def audio(self, pieces):
        """The waveform pieces `synthesise` made of `wave` -> events."""
        return self._settle([AudioChunk(ms.Tensor(piece)) for piece in pieces])

    def advance(self, results):
        """`results`: (request, logits, hidden) for each of `pending()`'s requests -> events."""
        events = []
        for request, logits, hidden in results:
            if request.loop is self.thinker:
                events += self._after_thinker(self.thinker.accept(request, logits, hidden))
            else:
                self.speech.accept(request, logits, hidden)
        return self._settle(events)

    def _after_thinker(self, step):
        token = int(step.tokens[0])
        if self.record is not None:
            self.record.append(step)
        events = [TextDelta(token, self.text.push(token, final=self.thinker.done))]
        if self.thinker.done and self.own_cache:
            self.cache.release()  # the Thinker is done; the Talker may still have a while to go
        if self.speech is not None:
            self.speech.after_thinker(step, self.thinker.done)
        return events

    def _settle(self, events):
        """Once the Thinker and the Talker are both done, the codes are all known: the stream ends
        (the audio left is made by the next `synthesise`). Done when that audio is out too."""
        if self.speech is not None and self.thinker.done and self.speech.done:
            self.speech.finish()
        self.done = self.thinker.done and (self.speech is None or self.speech.wave.drained)
        return events

    def __iter__(self):
        return stream(self)

    def close(self, error=None):
        """Free the caches; `error`: the exception that ended the answer, if one did."""
        prefill_now(self.close_steps(error))

    def close_steps(self, error=None):
        """`close` as a generator of the prefills it needs (a conversation keeping the answer), for
        a caller that runs those of several answers together (the voice server)."""
        if self.closed:
            return
        self.closed = True
        if self.own_cache:
            self.cache.release()
        if self.speech is not None:
            self.speech.close()
        if self.on_close is not None:
            yield from self.on_close(error) or ()


def stream(answer):
    """An answer's events, its decode steps run one by one (generate_stream). Closing the
    generator early ends the answer where it is."""
    try:
        yield from answer.start()
        while not answer.done:
            results = [(request, *request.loop.decode(request)) for request in answer.pending()]
            yield from answer.advance(results)
            prefill_now(answer.speech_start_steps())
            if answer.wave is not None:
                yield from answer.audio(answer.wave.synthesise())
    except GeneratorExit:
        answer.close()
        raise
    except BaseException as error:
        answer.close(error)
        raise
    answer.close()


class _Speech:
    """The Talker fed one answer token at a time, and Token2Wav fed its codec tokens."""

    def __init__(self, model, request, chunking, kept=None):
        self.model, self.answer_request, self.kept = model, request, kept
        self.first_steps = []
        self.prompt = self.codes = None
        self.start_taken = self.started = False  # the codes' prompt prefill: handed to the driver, done
        self.held = None  # the newest codec token: the answer's last one (a stop token or the cut) is dropped
        self.silent = False  # the Thinker ended before the Talker could start: nothing to say
        voice = request.voice
        self.wave = Token2WavStream(model.token2wav, voice.cond, voice.ref_mel, chunking, seed=request.seed,
                                    **request.token2wav_args)

    @property
    def done(self):
        """No more codec tokens will come (the Talker stopped, or never started: nothing was said)."""
        return self.codes.done if self.codes is not None else self.silent

    def after_thinker(self, step, thinker_done):
        if self.prompt is None:
            self.first_steps.append(step)
            if len(self.first_steps) == 2:  # the Talker's prompt ends with the first answer token's state
                self.prompt = self.model.talker_prompt(self.answer_request, *self.first_steps)
                self.codes = self.model.codec_loop(self.answer_request, self.prompt, self.kept)
        else:
            self.prompt.add_reply(step.embeds, step.hidden)
        if thinker_done:
            if self.prompt is None:
                self.silent = True
            else:
                self.prompt.finish()

    def start_steps(self):
        """The codes' prompt prefill, once (see Answer.speech_start_steps)."""
        if self.codes is None or self.start_taken:
            return ()
        self.start_taken = True
        return self._start()

    def _start(self):
        self._code((yield from self.codes.first_steps()))
        self.started = True

    def request(self):
        return self.codes.request() if self.started else None

    def accept(self, request, logits, hidden):
        self._code(self.codes.accept(request, logits, hidden))

    def _code(self, code):
        if self.held is not None:
            self.wave.add([self.held])
        self.held = code

    def finish(self):
        """The codes are all known: the Talker's cache is freed, the stream ends."""
        if not self.wave.finished:
            self.close()
            self.wave.end()

    def close(self):
        if self.codes is not None:
            self.codes.release()
