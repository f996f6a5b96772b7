"""A conversation kept in the Thinker's KV cache, prefilled while the user is still speaking.

Audio arrives in pieces. Its log-mel frames are computed as the processor computes them for the
whole clip, and each audio-encoder window (2 * n_window frames, 2 s in the released model) is
encoded and prefilled as soon as its frames are final, so when the user stops only the last
window is left before the answer starts. Two things make a frame final: the samples it covers
have arrived, and the clip's loudest frame so far is its loudest overall (Whisper features clamp
at max - 8 over the whole clip). When a louder frame arrives later and changes an encoded window,
that window and what follows are encoded and prefilled again, so the result always equals the
one-shot prefill of the whole clip.

Turns stay in the cache: a second question does not re-encode the first. Text and audio turns
only (their positions are the cache slots).

A turn can fail; the conversation cannot: whatever goes wrong inside a turn (its audio, its
answer) rewinds the conversation to before the turn, and the next turn starts from there. Every
turn is checked against the conversation's token limit before any of it is encoded.

What a turn prefills is written as generators of ExtendRequests, and EncodeRequests for its audio
(`ask_steps`, `begin_audio_steps`, `feed_audio_steps`, `end_audio_steps`): `ask`, `begin_audio`,
... run each request as it comes (`prefill_now`); the voice server runs the requests of several
conversations' turns together: their prefills as one batched step, their clips as one encoder
call (serve/engine.py).
"""
import contextlib

import numpy as np
from mindspore import ops

from ...generation.decode import PREFILL_CHUNK, ExtendRequest
from ...utils.audio import Pieces
from .audio_encoder import output_lengths
from .audio_features import clip_features
from .media_parts import audio_request
from .prefills import prefill_now
from .prompts import SYSTEM_PROMPT  # noqa: F401  (where callers have imported it from)
from .speech import KeptTalkerCache
from .answer import stream

# The system prompt the released model needs before it will speak (its model card says so).


ANSWER_CLOSING = 2  # tokens after an answer's last one: "<|im_end|>\n"


class ConversationFull(ValueError):
    """The conversation has no room left (its token limit) for a turn and its answer."""


class _AudioTurn:
    """The user's audio so far and the windows already prefilled."""

    def __init__(self, start):
        self.start = start  # cache slot of the first audio token
        self.received = Pieces()
        self.pieces = []  # per prefilled piece: (first window, last window + 1, cache slot it starts at, features)


def system_turn(prompt):
    """The system turn a conversation begins with, as the chat template writes it."""
    return f"<|im_start|>system\n{prompt}<|im_end|>\n"


def typed_turn(text):
    """A typed user turn and the assistant's opening, as the chat template writes them."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


class ConversationSession:
    """`max_tokens`: the conversation's limit (default and at most the Thinker's context);
    `answer_room`: tokens a turn must leave free for its answer (an answer's max_new_tokens);
    `system_ids`: the tokens of system_turn(system_prompt) when the caller made them already (a
    server tokenizes off the model's thread, as it does a typed turn's: see ask_steps);
    `keep_talker_cache`: the Talker's cache stays from one spoken answer to the next, so each
    prefills only the conversation's new part (its prompt is the whole conversation); a server
    whose memory bound counts a Talker cache per answer in progress, not per conversation, passes
    False."""

    def __init__(self, model, processor, system_prompt=SYSTEM_PROMPT, max_tokens=None, answer_room=0,
                 system_ids=None, keep_talker_cache=True):
        self.model, self.processor = model, processor
        config = model.config.thinker_config
        context = config.text_config.max_position_embeddings
        self.max_tokens = min(max_tokens or context, context)
        self.answer_room = answer_room
        if config.audio_config.n_window % 2:
            raise ValueError("streaming audio needs an even n_window (pooling pairs must not straddle windows)")
        self.window = 2 * config.audio_config.n_window
        self.audio_token = config.audio_token_index
        self.extractor = processor.feature_extractor
        self.runner = model.thinker_runner()
        self.cache = self.runner.allocate(1, min(512, self.max_tokens), model.thinker.model.embed_tokens.weight.dtype)
        self.talker = KeptTalkerCache() if keep_talker_cache and model.has_talker else None
        self.ids = np.zeros((1, 0), np.int64)
        self.embeds, self.hidden = [], []  # per prefilled piece, (1, n, E) and (1, n, H)
        self.clips = []  # each finished audio clip: (cache slot of its first token, mel frames)
        self.logits = None  # next-token logits after the last piece
        self.audio = None
        self.rewinds = 0  # prefilled audio pieces re-done because a louder frame moved the clamp
        self.turn_start = 0  # cache slot where the current user turn began: a failed turn rewinds here
        prefill_now(self._add_text(system_turn(system_prompt), "the system prompt", ids=system_ids))

    # ------------------------------------------------------------------ prefilling

    def _check_room(self, tokens, what, answer=True):
        """Refuse, before any work, `tokens` more that would leave no room for an answer of
        `answer_room` tokens and its closing (`answer`=False: the answer's own closing)."""
        used = self.cache.length
        room = self.answer_room + ANSWER_CLOSING if answer else 0
        if used + tokens + room > self.max_tokens:
            raise ConversationFull(
                f"the conversation holds {used} tokens; {what} needs {tokens} more"
                f"{f' and its answer up to {room}' if room else ''}, over its limit of {self.max_tokens} "
                "tokens: start a new conversation")

    def _append(self, ids, embeds):
        """Prefill tokens: yields an ExtendRequest per part of at most PREFILL_CHUNK tokens (a
        server runs other answers' steps between a long turn's parts), each sent back (logits, hidden)."""
        self._check_open()
        self.runner.reserve(self.cache, self.cache.length + len(ids))  # once: a growth copies every row
        for lo in range(0, len(ids), PREFILL_CHUNK):
            yield from self._append_part(ids[lo:lo + PREFILL_CHUNK], embeds[:, lo:lo + PREFILL_CHUNK])

    def _check_open(self):
        if self.cache.released:  # closed while a turn was on its way (its client gone, in a server)
            raise ValueError("the conversation is closed")

    def _append_part(self, ids, embeds):
        self._check_open()
        n = len(ids)
        start = self.cache.length
        positions = np.broadcast_to(np.arange(start, start + n), (3, 1, n)).copy()
        self.logits, hidden = yield ExtendRequest(self.cache, embeds, positions)
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)[None]], 1)
        self.embeds.append(embeds)
        self.hidden.append(hidden)

    def _truncate(self, length):
        """Forget everything from cache slot `length` on (a piece boundary)."""
        ends = [0] + np.cumsum([e.shape[1] for e in self.embeds]).tolist()
        if length not in ends:
            raise RuntimeError(f"cache slot {length} is not a piece boundary")
        kept = ends.index(length)
        self.embeds, self.hidden = self.embeds[:kept], self.hidden[:kept]
        self.ids = self.ids[:, :length]
        self.cache.truncate(length)
        if self.talker is not None:
            self.talker.forget_from(length)

    def add_text(self, text, what="this turn", answer=True):
        prefill_now(self._add_text(text, what, answer))

    def _add_text(self, text, what="this turn", answer=True, ids=None):
        ids = self.processor.tokenizer(text)["input_ids"] if ids is None else list(ids)
        if ids:
            self._check_room(len(ids), what, answer)
            yield from self._append(ids, self.model.thinker.embed(np.asarray(ids)[None]))

    @contextlib.contextmanager
    def _turn(self, begins=False):
        """The body of a user turn (`begins`: its first step): on any error the conversation is
        rewound to before the turn."""
        if begins:
            self._no_audio_turn()
            self.turn_start = self.cache.length
        try:
            yield
        except Exception:
            if not self.cache.released:  # a closed conversation's rows may be another's by now
                self.rewind(self.turn_start)
            raise

    def ask(self, text):
        """A text question as the user's turn."""
        prefill_now(self.ask_steps(text))

    def ask_steps(self, text, ids=None):
        """`ids`: the tokens of typed_turn(text) when the caller made them already: a server's
        text message may be up to 1 MiB, ~0.8 s to tokenize, which on the model's thread would
        stall every conversation's answer."""
        with self._turn(begins=True):
            yield from self._add_text(typed_turn(text), ids=ids)

    # ------------------------------------------------------------------ audio

    def begin_audio(self):
        """The user starts speaking: their turn opens and audio pieces may follow."""
        prefill_now(self.begin_audio_steps())

    def begin_audio_steps(self):
        with self._turn(begins=True):
            yield from self._add_text("<|im_start|>user\n<|audio_bos|>")
            self.audio = _AudioTurn(self.cache.length)

    def rewind(self, length):
        """Forget everything from cache slot `length` on (a turn boundary: `cache.length` before
        the turn began), an open audio turn included; a new turn must follow before respond()."""
        self._truncate(length)
        self.clips = [clip for clip in self.clips if clip[0] < length]
        self.audio, self.logits = None, None

    def feed_audio(self, samples):
        """A piece of the user's speech (mono float32, 16 kHz): every encoder window whose frames
        are final is prefilled now."""
        prefill_now(self.feed_audio_steps(samples))

    def feed_audio_steps(self, samples):
        if self.audio is None:
            raise ValueError("begin_audio() first: no audio turn is open")
        with self._turn():
            samples = np.asarray(samples, np.float32).reshape(-1)
            if not np.all(np.isfinite(samples)):
                raise ValueError("audio piece contains NaN or infinite samples")
            total = self.audio.received.count + len(samples)
            limit = self.extractor.n_samples
            if total > limit:
                raise ValueError(f"an audio turn holds at most {limit / self.extractor.sampling_rate:.0f} s "
                                 "(the feature extractor's window, as in the processor)")
            audio_tokens = int(output_lengths([total // self.extractor.hop_length])[1][0])
            self._check_room(max(0, self.audio.start + audio_tokens - self.cache.length), "the audio so far")
            self.audio.received.add(samples)
            half = self.extractor.n_fft // 2
            final_frames = max(0, (total - half) // self.extractor.hop_length + 1)
            upto = final_frames // self.window * self.window
            pieces = self.audio.pieces
            if upto <= (pieces[-1][1] * self.window if pieces else 0):
                # no new whole window: the features (of the whole turn so far) wait for one, so a
                # turn costs a computation per window, not per piece (a 30 s turn in 20 ms pieces
                # took 10.9 s on the tiny checkpoint, in 1 s pieces 0.9 s); a louder frame's moved
                # clamp is then found at the next window, or at the turn's end
                return
            yield from self._prefill_windows(clip_features(self.extractor, self.audio.received.joined())[0], upto)

    def end_audio(self, text=""):
        """The user stopped speaking: the rest of the audio, then `text` (if any), close the turn
        and the assistant's turn opens."""
        prefill_now(self.end_audio_steps(text))

    def end_audio_steps(self, text=""):
        if self.audio is None:
            raise ValueError("begin_audio() first: no audio turn is open")
        with self._turn():
            if not self.audio.received.count:
                raise ValueError("the audio turn is empty")
            features, frames = clip_features(self.extractor, self.audio.received.joined())
            yield from self._prefill_windows(features, frames)
            tokens = self.ids.shape[1] - self.audio.start
            expected = int(output_lengths([frames])[1][0])
            if tokens != expected:
                raise RuntimeError(f"prefilled {tokens} audio tokens for {frames} frames, expected {expected}")
            if tokens == 0:
                raise ValueError(f"the audio turn is too short ({frames} feature frames) to give an audio token")
            self.clips.append((self.audio.start, frames))
            self.audio = None
            yield from self._add_text(f"<|audio_eos|>{text}<|im_end|>\n<|im_start|>assistant\n")

    def _prefill_windows(self, features, upto):
        """Prefill frames up to `upto` (whole windows, or the clip's end), first re-doing any
        prefilled piece whose features changed (a louder frame moved the clamp)."""
        pieces = self.audio.pieces
        changed = next((i for i, (a, b, _, f) in enumerate(pieces)
                        if not np.array_equal(f, features[:, a * self.window:b * self.window])), None)
        if changed is not None:
            self.rewinds += 1
            self._truncate(pieces[changed][2])
            del pieces[changed:]
        done = pieces[-1][1] * self.window if pieces else 0
        # 1-2 frames past a window make one conv token, which the clip's 2x pooling drops (as in
        # the reference): nothing to encode or prefill
        request = audio_request(self.model.thinker.audio_tower, features[:, done:upto])
        if request.tokens <= 0:
            return
        piece = request.inputs
        audio = yield request
        start = self.cache.length
        yield from self._append([self.audio_token] * audio.shape[0], audio[None].astype(self.embeds[0].dtype))
        pieces.append((done // self.window, -(-upto // self.window), start, piece))

    def _no_audio_turn(self):
        if self.audio is not None:
            raise ValueError("an audio turn is open: end_audio() first")

    # ------------------------------------------------------------------ answering

    def respond(self, tokenizer=None, chunking=None, **kwargs):
        """The assistant's answer to the conversation so far, as `generate_stream` events; the
        answer then joins the conversation (also when the stream is closed early: what was said
        so far)."""
        return stream(self.answer(tokenizer, chunking, **kwargs))

    def answer(self, tokenizer=None, chunking=None, **kwargs):
        """respond()'s answer as an explicit pipeline (answer.Answer), for a caller that runs the
        decode steps itself. Its close() keeps what was said in the conversation, or, after an
        error, rewinds the conversation to before the user's turn."""
        self._no_audio_turn()
        if self.logits is None:
            raise ValueError("nothing to answer: the last user turn was cancelled")
        model = self.model
        kwargs.setdefault("return_audio", model.has_talker)
        media = {}
        if self.clips:  # what the Talker needs of the audio: where it is and each clip's length
            lengths = np.asarray([frames for _, frames in self.clips])
            mask = (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int64)
            media = {"input_features": None, "feature_attention_mask": mask}
        steps = []
        with self._turn():
            prepared = _Prepared(ops.cat(self.embeds, 1), ops.cat(self.hidden, 1), self.logits.copy(), media)
            answer = model.answer(tokenizer, chunking, cache=self.cache, record=steps, prepared=prepared,
                                  talker_cache=self.talker, input_ids=self.ids, **kwargs)
            self._check_room(answer.request.max_new + ANSWER_CLOSING,
                             f"an answer of up to {answer.request.max_new} tokens", answer=False)
        # closed by an error: the conversation as before the user's turn; else it keeps the answer
        answer.on_close = lambda error: self.rewind(self.turn_start) if error else self._keep_answer(steps)
        return answer

    def _keep_answer(self, steps):
        """The answer's tokens but the last are in the cache (step i + 1 holds token i's states);
        the last token and the turn's end follow, in one prefill (yielded, as a turn's are)."""
        if not steps:
            return
        fed = [int(tokens[0]) for tokens, _, _ in steps[:-1]]
        self.ids = np.concatenate([self.ids, np.asarray(fed, np.int64).reshape(1, -1)], 1)
        for _, embeds, hidden in steps[1:]:
            self.embeds.append(embeds)
            self.hidden.append(hidden)
        last = int(steps[-1][0][0])
        im_end = self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = [last] + self.processor.tokenizer("\n" if last == im_end else "<|im_end|>\n")["input_ids"]
        self._check_room(len(ids), "the end of the answer", answer=False)
        yield from self._append(ids, self.model.thinker.embed(np.asarray([ids])))

    def close(self):
        """Free the caches (the session is over)."""
        self.cache.release()
        if self.talker is not None:
            self.talker.release()
        self.embeds, self.hidden, self.audio = [], [], None


class _Prepared:
    """A prompt already in the cache: `prefilled` = (last logits, all hidden states) for the
    Thinker's first token; `media` what the Talker needs to know of the conversation's audio."""

    def __init__(self, embeds, hidden, logits, media):
        self.media = media
        self.inputs_embeds = embeds
        self.position_ids = None
        self.rope_deltas = np.zeros((1, 1), np.int64)
        self.prefilled = (logits, hidden)

    def encode_steps(self):
        return ()  # nothing left to encode: the audio was encoded as it came
