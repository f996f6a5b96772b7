"""From the Thinker's answer to speech: the Talker's prompt built the reference's way, codec
token generation, and Token2Wav.

What the Talker reads, per position: the Thinker's last hidden state plus the token's input
embedding (media positions zeroed) for the prompt, then the speaker's text bos and the first
answer token; afterwards, one answer token per codec step (then the tts eos and pad
embeddings, the pad repeated once the answer is used up), each added to the embedding of the
previous codec token.
"""
import numpy as np
from mindspore import Tensor, ops

from ...generation import CompiledDecoder, SamplingConfig, TokenLookup, TokenLoop
from ...generation.decode import prompt_parts
from .prefills import prefill_now
from .rope_index import RopeTokens, get_rope_index

TALKER_DEFAULTS = dict(max_new_tokens=4096, do_sample=True, top_k=40, top_p=0.8, temperature=0.9,
                       repetition_penalty=1.05, eos_token_id=(8292, 8294))


def zero_media_positions(embeds, ids, thinker_config, media):
    """The reference hides media features from the Talker: rows of <|AUDIO|>/<|IMAGE|>/<|VIDEO|>
    become zero when that kind of media was given."""
    tokens = [thinker_config.audio_token_index] * ("input_features" in media) + \
        [thinker_config.image_token_index] * ("pixel_values" in media) + \
        [thinker_config.video_token_index] * ("pixel_values_videos" in media)
    if not tokens:
        return embeds
    keep = Tensor((~np.isin(ids, tokens))[..., None].astype(np.float32), embeds.dtype)
    return embeds * keep


class TalkerPrompt:
    """The Talker's inputs for one answer (batch 1). The prompt needs the Thinker's prompt and its
    first answer token; the answer tokens after it are added as the Thinker produces them
    (`add_reply`), then `finish()` appends the tts eos and pad the Talker reads at the end."""

    def __init__(self, talker, thinker, prompt_ids, prompt_embeds, prompt_hidden, first_answer_id, first_embeds,
                 first_hidden, speaker_bos):
        self.embed = lambda ids: thinker.embed(np.asarray(ids).reshape(1, -1))
        self.talker = talker
        codec = talker.codec_embedding(np.array([[talker.codec_pad_token, talker.codec_bos_token]]))
        tail = ops.cat((self.embed([speaker_bos]), first_hidden + first_embeds), 1) + codec
        self.embeds = ops.cat((prompt_hidden + prompt_embeds, tail), 1)
        self.conversation = prompt_ids.shape[1]  # its first tokens: the conversation (the Thinker's prompt)
        self.text_ids = np.concatenate([prompt_ids, [[speaker_bos, first_answer_id]]], 1)
        self.codec_ids = np.concatenate([np.full_like(prompt_ids, talker.codec_mask_token),
                                         [[talker.codec_pad_token, talker.codec_bos_token]]], 1)
        self.replies = []  # (1, 1, E) per answer token after the first
        self.finished = False

    def add_reply(self, embeds, hidden):
        self.replies.append(hidden + embeds)

    def finish(self):
        self.replies += [self.embed([self.talker.text_eos_token]), self.embed([self.talker.text_pad_token])]
        self.finished = True

    def ready(self, step):
        """Whether the input of decode step `step` is known yet."""
        return self.finished or step < len(self.replies)

    def reply_at(self, step):
        if not self.ready(step):
            raise RuntimeError(f"the Talker's step {step} needs an answer token the Thinker has not produced yet")
        return self.replies[min(step, len(self.replies) - 1)]  # the pad repeats once the answer is used up


def talker_positions(talker_config, prompt, media, use_audio_in_video):
    spec = RopeTokens.from_config(talker_config)
    mask = np.ones_like(prompt.text_ids)
    feature_mask = media.get("feature_attention_mask")
    return get_rope_index(spec, prompt.text_ids, media.get("image_grid_thw"), media.get("video_grid_thw"), mask,
                          use_audio_in_video, None if feature_mask is None else np.asarray(feature_mask).sum(1),
                          media.get("video_second_per_grid"))


class KeptTalkerCache:
    """A conversation's Talker cache, kept from one answer to the next. An answer's Talker prompt
    starts with the whole conversation so far, whose keys do not change as it grows (causal
    attention, the same inputs and positions), so the next answer prefills only what follows
    `prefix`: the conversation's tokens whose keys the cache holds (an answer's own prompt tail
    and codec steps come after them, and are overwritten)."""

    def __init__(self):
        self.cache, self.prefix = None, 0

    def forget_from(self, length):
        """The conversation was cut back to its first `length` tokens."""
        self.prefix = min(self.prefix, length)

    def release(self):
        if self.cache is not None:
            self.cache.release()
        self.cache, self.prefix = None, 0


class CodecLoop:
    """The Talker's codec tokens for one answer, as an explicit loop (see generation.TokenLoop):
    `first()` prefills the prompt and gives the first code; then, while not `done`, `request()`
    is the next decode step when its input is known (None while the prompt still waits for the
    Thinker's answer token it reads) and `accept` gives the code it produced. Codes include the
    last one (a stop token or the cut). `release()` frees the cache, unless it is `kept`'s (a
    KeptTalkerCache: the prompt's part already in it is not prefilled again)."""

    def __init__(self, talker, runner, prompt, positions, deltas, settings, seed, kept=None):
        self.talker, self.runner, self.prompt, self.positions, self.kept = talker, runner, prompt, positions, kept
        slots = prompt.embeds.shape[1] + settings["max_new_tokens"]
        if kept is None or kept.cache is None:
            self.cache = runner.allocate(1, slots, prompt.embeds.dtype)
            if kept is not None:
                kept.cache, kept.prefix = self.cache, 0
        else:
            self.cache = kept.cache
            runner.reserve(self.cache, slots)
        self.loop = TokenLoop(runner, self.cache, prompt.codec_ids, deltas, settings["max_new_tokens"],
                              SamplingConfig.from_settings(settings, seed), list(settings["eos_token_id"]),
                              talker.codec_pad_token, self._embed_next, suppress_ids=[talker.codec_bos_token])

    def _embed_next(self, step, tokens):
        return TokenLookup(self.talker.model.embed_tokens, tokens[:, None], self.prompt.reply_at(step))

    @property
    def done(self):
        return self.loop.done

    def first(self):
        return prefill_now(self.first_steps())

    def first_steps(self):
        """`first` as a generator of the prompt's prefill in parts (generation.decode.prompt_parts)."""
        start = 0
        if self.kept is not None:  # while the rest is written, what is before it stays valid
            start = self.kept.prefix = min(self.kept.prefix, self.prompt.conversation)
        logits, hidden = yield from prompt_parts(self.cache, self.prompt.embeds, self.positions, start)
        if self.kept is not None:
            self.kept.prefix = self.prompt.conversation
        return int(self.loop.first(logits, hidden, self.prompt.embeds).tokens[0])

    def request(self):
        if self.loop.done or not self.prompt.ready(self.loop.count - 1):
            return None
        return self.loop.request()

    def accept(self, request, logits, hidden):
        return int(self.loop.accept(request, logits, hidden).tokens[0])

    def codes(self):
        """Every code, the decode steps run one by one (the prompt must be finished)."""
        try:
            yield self.first()
            while not self.done:
                request = self.request()
                yield self.accept(request, *self.loop.decode(request))
        finally:
            self.release()

    def release(self):
        if self.kept is None:
            self.cache.release()


def talker_runner(talker):
    return CompiledDecoder(talker.model, talker.codec_head, talker.config, input_proj=talker.thinker_to_talker_proj,
                           name="Talker")

