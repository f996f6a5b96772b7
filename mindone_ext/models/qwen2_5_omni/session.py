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
"""
import numpy as np
from mindspore import ops

from .audio_encoder import output_lengths
from .streaming import stream_answer

# The system prompt the released model needs before it will speak (its model card says so).
SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
                 "auditory and visual inputs, as well as generating text and speech.")


class _AudioTurn:
    """The user's audio so far and the windows already prefilled."""

    def __init__(self, start):
        self.start = start  # cache slot of the first audio token
        self.samples = np.zeros(0, np.float32)
        self.pieces = []  # per prefilled piece: (first window, last window + 1, cache slot it starts at, features)


class ConversationSession:
    def __init__(self, model, processor, system_prompt=SYSTEM_PROMPT):
        self.model, self.processor = model, processor
        config = model.config.thinker_config
        if config.audio_config.n_window % 2:
            raise ValueError("streaming audio needs an even n_window (pooling pairs must not straddle windows)")
        self.window = 2 * config.audio_config.n_window
        self.audio_token = config.audio_token_index
        self.extractor = processor.feature_extractor
        self.runner = model.thinker_runner()
        self.cache = self.runner.allocate(1, 512, model.thinker.model.embed_tokens.weight.dtype)
        self.ids = np.zeros((1, 0), np.int64)
        self.embeds, self.hidden = [], []  # per prefilled piece, (1, n, E) and (1, n, H)
        self.clips = []  # each finished audio clip: (cache slot of its first token, mel frames)
        self.logits = None  # next-token logits after the last piece
        self.audio = None
        self.rewinds = 0  # prefilled audio pieces re-done because a louder frame moved the clamp
        self.add_text(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")

    # ------------------------------------------------------------------ prefilling

    def _append(self, ids, embeds):
        n = len(ids)
        start = self.cache.length
        self.runner.reserve(self.cache, start + n)
        positions = np.broadcast_to(np.arange(start, start + n), (3, 1, n)).copy()
        self.logits, hidden = self.runner.extend(self.cache, embeds, positions)
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)[None]], 1)
        self.embeds.append(embeds)
        self.hidden.append(hidden)

    def _truncate(self, length):
        """Forget everything from cache slot `length` on (a piece boundary)."""
        kept, total = 0, 0
        while total < length:
            total += self.embeds[kept].shape[1]
            kept += 1
        self.embeds, self.hidden = self.embeds[:kept], self.hidden[:kept]
        self.ids = self.ids[:, :length]
        self.cache.truncate(length)

    def add_text(self, text):
        ids = self.processor.tokenizer(text)["input_ids"]
        if ids:
            self._append(ids, self.model.thinker.embed(np.asarray(ids)[None]))

    def ask(self, text):
        """A text question as the user's turn."""
        self._no_audio_turn()
        self.add_text(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")

    # ------------------------------------------------------------------ audio

    def begin_audio(self):
        """The user starts speaking: their turn opens and audio pieces may follow."""
        self._no_audio_turn()
        self.add_text("<|im_start|>user\n<|audio_bos|>")
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
        if self.audio is None:
            raise ValueError("begin_audio() first: no audio turn is open")
        samples = np.asarray(samples, np.float32).reshape(-1)
        if not np.all(np.isfinite(samples)):
            raise ValueError("audio piece contains NaN or infinite samples")
        limit = self.extractor.n_samples
        if len(self.audio.samples) + len(samples) > limit:
            raise ValueError(f"an audio turn holds at most {limit / self.extractor.sampling_rate:.0f} s "
                             "(the feature extractor's window, as in the processor)")
        self.audio.samples = np.concatenate([self.audio.samples, samples])
        features, _ = self._features()
        half = self.extractor.n_fft // 2
        final_frames = max(0, (len(self.audio.samples) - half) // self.extractor.hop_length + 1)
        self._prefill_windows(features, final_frames // self.window * self.window)

    def end_audio(self, text=""):
        """The user stopped speaking: the rest of the audio, then `text` (if any), close the turn
        and the assistant's turn opens."""
        if self.audio is None:
            raise ValueError("begin_audio() first: no audio turn is open")
        if not len(self.audio.samples):
            raise ValueError("the audio turn is empty")
        features, frames = self._features(whole=True)
        self._prefill_windows(features, frames)
        tokens = self.ids.shape[1] - self.audio.start
        expected = int(output_lengths([frames])[1][0])
        if tokens != expected:
            raise RuntimeError(f"prefilled {tokens} audio tokens for {frames} frames, expected {expected}")
        self.clips.append((self.audio.start, frames))
        self.audio = None
        self.add_text(f"<|audio_eos|>{text}<|im_end|>\n<|im_start|>assistant\n")

    def _features(self, whole=False):
        """Log-mel features and valid frames. `whole`: exactly as the processor pads the clip (to
        the extractor's full window, minutes of zeros); while the user speaks, only a frame's worth
        of zeros past the audio, which gives the same values for the final frames at a fraction of
        the cost (any difference is caught by the comparison in `_prefill_windows`)."""
        length = self.extractor.n_samples if whole else len(self.audio.samples) + self.extractor.n_fft
        out = self.extractor(self.audio.samples, sampling_rate=self.extractor.sampling_rate, padding="max_length",
                             max_length=length, return_attention_mask=True, return_tensors="np")
        return out["input_features"][0].astype(np.float32), int(out["attention_mask"][0].sum())

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
        if upto <= done:
            return
        piece = features[:, done:upto]
        audio = self.model.thinker.audio_tower(piece, [upto - done])
        start = self.cache.length
        self._append([self.audio_token] * audio.shape[0], audio[None].astype(self.embeds[0].dtype))
        pieces.append((done // self.window, -(-upto // self.window), start, piece))

    def _no_audio_turn(self):
        if self.audio is not None:
            raise ValueError("an audio turn is open: end_audio() first")

    # ------------------------------------------------------------------ answering

    def respond(self, tokenizer=None, chunking=None, **kwargs):
        """The assistant's answer to the conversation so far, as `generate_stream` events; the
        answer then joins the conversation (also when the stream is closed early: what was said
        so far)."""
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
        prepared = _Prepared(ops.cat(self.embeds, 1), ops.cat(self.hidden, 1), self.logits.copy())
        args = model.bind_generate_args(dict(kwargs, input_ids=self.ids))
        plan = model._plan(args, args.pop("kwargs"), prepared=prepared)
        plan.media = media
        steps = []
        try:
            yield from stream_answer(model, plan, tokenizer, chunking, cache=self.cache, record=steps)
        finally:
            self._keep_answer(steps)

    def _keep_answer(self, steps):
        """The answer's tokens but the last are in the cache (step i + 1 holds token i's states);
        the last token and the turn's end follow."""
        if not steps:
            return
        fed = [int(tokens[0]) for tokens, _, _ in steps[:-1]]
        self.ids = np.concatenate([self.ids, np.asarray(fed, np.int64).reshape(1, -1)], 1)
        for _, embeds, hidden in steps[1:]:
            self.embeds.append(embeds)
            self.hidden.append(hidden)
        last = int(steps[-1][0][0])
        self._append([last], self.model.thinker.embed(np.array([[last]])))
        im_end = self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.add_text("\n" if last == im_end else "<|im_end|>\n")


    def close(self):
        """Free the cache (the session is over)."""
        self.cache.release()
        self.embeds, self.hidden, self.audio = [], [], None


class _Prepared:
    """A prompt already in the cache: `prefilled` = (last logits, all hidden states) for iter_tokens."""

    def __init__(self, embeds, hidden, logits):
        self.inputs_embeds = embeds
        self.position_ids = None
        self.rope_deltas = np.zeros((1, 1), np.int64)
        self.prefilled = (logits, hidden)
