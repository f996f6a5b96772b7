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

from ...generation import CompiledDecoder, SamplingConfig, iter_tokens
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
    """The Talker's inputs for one answer (batch 1)."""

    def __init__(self, talker, thinker, prompt_ids, prompt_embeds, prompt_hidden, first_answer_id, answer_embeds,
                 answer_hidden, speaker_bos):
        embed = lambda ids: thinker.embed(np.asarray(ids).reshape(1, -1))  # noqa: E731
        # the answer tokens the Talker reads one by one: all but the last one generated, then eos, pad
        reply = [h + e for h, e in zip(answer_hidden, answer_embeds)]
        reply += [embed([talker.text_eos_token]), embed([talker.text_pad_token])]
        first = reply[0]
        self.reply = ops.cat(reply[1:], 1)  # (1, n, E)
        codec = talker.codec_embedding(np.array([[talker.codec_pad_token, talker.codec_bos_token]]))
        tail = ops.cat((embed([speaker_bos]), first), 1) + codec
        self.embeds = ops.cat((prompt_hidden + prompt_embeds, tail), 1)
        self.text_ids = np.concatenate([prompt_ids, [[speaker_bos, first_answer_id]]], 1)
        self.codec_ids = np.concatenate([np.full_like(prompt_ids, talker.codec_mask_token),
                                         [[talker.codec_pad_token, talker.codec_bos_token]]], 1)

    def reply_at(self, step):
        i = min(step, self.reply.shape[1] - 1)
        return self.reply[:, i:i + 1]


def talker_positions(talker_config, prompt, media, use_audio_in_video):
    spec = RopeTokens.from_config(talker_config)
    mask = np.ones_like(prompt.text_ids)
    feature_mask = media.get("feature_attention_mask")
    return get_rope_index(spec, prompt.text_ids, media.get("image_grid_thw"), media.get("video_grid_thw"), mask,
                          use_audio_in_video, None if feature_mask is None else np.asarray(feature_mask).sum(1),
                          media.get("video_second_per_grid"))


def generate_codes(talker, runner, prompt, positions, deltas, settings, seed):
    """Codec tokens (n,) for one answer; the last token (the stop token, or the last of an answer
    cut at max_new_tokens) is dropped, as the reference does."""
    sampling = SamplingConfig.from_settings(settings, seed)
    cache = runner.allocate(1, prompt.embeds.shape[1] + settings["max_new_tokens"], prompt.embeds.dtype)
    mask = np.ones_like(prompt.codec_ids)

    def embed_next(step, tokens):
        return talker.codec_embedding(tokens[:, None]) + prompt.reply_at(step)

    try:
        codes = [int(t[0]) for t, _, _ in iter_tokens(
            runner, cache, prompt.embeds, prompt.codec_ids, mask, positions, deltas, settings["max_new_tokens"],
            sampling, list(settings["eos_token_id"]), talker.codec_pad_token, embed_next,
            suppress_ids=[talker.codec_bos_token])]
    finally:
        cache.release()
    return np.asarray(codes[:-1], np.int64)


def talker_runner(talker):
    return CompiledDecoder(talker.model, talker.codec_head, talker.config, input_proj=talker.thinker_to_talker_proj)

