"""The Thinker: audio and vision encoders whose features replace the placeholder tokens' embeddings,
and the Qwen2.5 text decoder with TMRoPE plus its LM head.

Names and forward arguments mirror the reference (`thinker.model.layers.N...`, `thinker.audio_tower`,
`thinker.visual`, `thinker.lm_head`; `thinker(input_ids=..., attention_mask=..., input_features=...,
pixel_values=..., ...)` returning an output with `.logits`).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ...nn.decoder import Qwen2Decoder
from ...nn.layers import Linear
from .audio_encoder import Qwen2_5OmniAudioEncoder, output_lengths
from .media_parts import audio_parts, vision_parts
from .rope_index import RopeTokens, get_rope_index
from .vision_encoder import Qwen2_5OmniVisionEncoder


@dataclass
class ThinkerOutput:
    logits: Tensor
    last_hidden_state: Tensor
    rope_deltas: Optional[np.ndarray] = None


@dataclass
class PreparedInputs:
    """What the decoder needs for a prompt: merged embeddings and TMRoPE positions."""
    inputs_embeds: Tensor  # (B, T, H)
    position_ids: np.ndarray  # (3, B, T)
    rope_deltas: np.ndarray  # (B, 1): decode position = cache slot + delta
    attention_mask: np.ndarray  # (B, T)
    # media not yet in inputs_embeds (prepare_inputs(media_in_parts=True)): (ids, [(placeholder
    # token, name, its parts' EncodeRequests)])
    unencoded: tuple = None

    def encode_steps(self):
        """The media left to encode, as a generator of their parts' EncodeRequests, each sent back
        its embeddings; then inputs_embeds holds them."""
        if self.unencoded is None:
            return
        ids, media = self.unencoded
        for token_id, what, parts in media:
            if parts:
                features = []
                for part in parts:
                    features.append((yield part))
                features = features[0] if len(features) == 1 else ops.cat(features, 0)
                self.inputs_embeds = scatter_rows(self.inputs_embeds, ids, token_id, features, what)
        self.unencoded = None


def as_numpy(x, dtype=None):
    if x is None:
        return None
    if isinstance(x, Tensor):
        x = x.asnumpy()
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def audio_clips(input_features, feature_attention_mask):
    """input_features (clips, mel, frames) padded, the mask (clips, frames) -> each clip's valid
    frames (mel, frames)."""
    # no copy of float32 features: the processor's are padded to 30 s (15 MB), and a copy of them
    # took 4 ms, 35-40 ms in a process's first answer (its pages new)
    features = np.asarray(as_numpy(input_features), np.float32)
    mask = as_numpy(feature_attention_mask, bool)
    if features.ndim != 3 or mask is None or mask.shape != (features.shape[0], features.shape[2]):
        raise ValueError("input_features must be (clips, mel bins, frames) with a feature_attention_mask of "
                         f"(clips, frames); got {features.shape} and {None if mask is None else mask.shape}")
    return [clip[:, valid] for clip, valid in zip(features, mask)]


def placeholders(ids, token_id, rows, what):
    """Where `token_id` is in `ids` (flat), checked to be `rows` places."""
    where = np.flatnonzero(ids.reshape(-1) == token_id)
    if len(where) != rows:
        raise ValueError(f"{what} features and {what} tokens do not match: {len(where)} placeholder tokens in "
                         f"input_ids, {rows} feature rows (was the prompt built by the processor?)")
    return where


def scatter_rows(embeds, ids, token_id, features, what):
    """Replace the embeddings at every `token_id` with `features`, in order (the reference's
    masked_scatter), as one gather over [embeddings; features] so it is differentiable."""
    b, t, h = embeds.shape
    where = placeholders(ids, token_id, features.shape[0], what)
    source = np.arange(b * t)
    source[where] = b * t + np.arange(len(where))
    table = ops.cat((embeds.reshape(b * t, h), features.astype(embeds.dtype)), 0)
    return ops.gather(table, Tensor(source.astype(np.int32)), 0).reshape(b, t, h)


MULTIMODAL_INPUTS = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
                     "pixel_values_videos", "video_grid_thw", "use_audio_in_video", "video_second_per_grid")


class Qwen2_5OmniThinkerForConditionalGeneration(nn.Cell):
    def __init__(self, config, dtype=ms.float32, attn_implementation="eager"):
        super().__init__()
        self.config = config
        text = config.text_config
        self.audio_tower = Qwen2_5OmniAudioEncoder(config.audio_config, dtype, attn_implementation)
        self.visual = Qwen2_5OmniVisionEncoder(config.vision_config, dtype, attn_implementation)
        self.model = Qwen2Decoder(text, dtype, attn_implementation)
        self.lm_head = Linear(text.hidden_size, text.vocab_size, False, dtype)
        self.tied_word_embeddings = bool(getattr(text, "tie_word_embeddings", False))
        if self.tied_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope_tokens = RopeTokens.from_config(config)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """The Thinker of a Qwen2.5-Omni folder alone (the talker and token2wav weights are not
        read), as transformers' class of this name loads it; `generate` gives text."""
        from .model import Qwen2_5OmniForConditionalGeneration

        whole = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, enable_audio_output=False, **kwargs)
        whole.thinker.__dict__["_whole"] = whole  # a plain reference, not a sub-cell: no second copy of its weights
        return whole.thinker

    def generate(self, **kwargs):
        """Text generation, as the whole model's `generate(..., return_audio=False)`."""
        whole = self.__dict__.get("_whole")
        if whole is None:
            raise ValueError("generate() needs a Thinker loaded with "
                             "Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path)")
        return whole.generate(return_audio=False, **kwargs)

    @property
    def device(self):
        return ms.get_context("device_target")

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def embed(self, input_ids):
        return self.model.embed_tokens.lookup(as_numpy(input_ids, np.int32))

    # ------------------------------------------------------------------ encoders

    def get_audio_features(self, input_features, feature_attention_mask):
        """input_features (clips, mel, frames) padded; mask (clips, frames) -> (tokens, hidden)."""
        clips = audio_clips(input_features, feature_attention_mask)
        lengths = [clip.shape[1] for clip in clips]
        audio = self.audio_tower(np.concatenate(clips, 1), lengths)  # the valid frames, clip after clip
        expected = int(output_lengths(lengths)[1].sum())
        if audio.shape[0] != expected:
            raise ValueError(f"audio encoder returned {audio.shape[0]} tokens, expected {expected}")
        return audio

    def get_image_features(self, pixel_values, image_grid_thw):
        return self.visual(pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos, video_grid_thw):
        return self.visual(pixel_values_videos, video_grid_thw)

    def _media_parts(self, ids, input_features, feature_attention_mask, pixel_values, image_grid_thw,
                     pixel_values_videos, video_grid_thw):
        """The media as parts to encode apart (media_parts.py), their placeholders checked first."""
        c, media = self.config, []
        if input_features is not None:
            media.append((c.audio_token_index, "audio", audio_parts(
                self.audio_tower, audio_clips(input_features, feature_attention_mask))))
        for token_id, what, pixels, grid in ((c.image_token_index, "image", pixel_values, image_grid_thw),
                                             (c.video_token_index, "video", pixel_values_videos, video_grid_thw)):
            if pixels is not None:
                media.append((token_id, what, vision_parts(self.visual, as_numpy(pixels), as_numpy(grid), what)))
        for token_id, what, parts in media:
            placeholders(ids, token_id, sum(part.tokens for part in parts), what)
        return ids, media

    def prepare_inputs(self, input_ids, attention_mask=None, input_features=None, feature_attention_mask=None,
                       pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                       use_audio_in_video=False, video_second_per_grid=None, position_ids=None, inputs_embeds=None,
                       media_in_parts=False):
        """The prompt's embeddings (the media's features in their placeholders' places) and TMRoPE
        positions. `media_in_parts`: the media are not encoded here; the result's `encode_steps()`
        encodes them in parts (an answer's start: the voice server runs them between rounds)."""
        ids = as_numpy(input_ids, np.int64)
        embeds = self.embed(ids) if inputs_embeds is None else inputs_embeds
        b, t = embeds.shape[:2]
        mask = np.ones((b, t), np.int64) if attention_mask is None else as_numpy(attention_mask, np.int64)
        c = self.config
        # cut into parts either way: the media's shapes, pixel rows and placeholders are checked before any is encoded
        parts = self._media_parts(ids, input_features, feature_attention_mask, pixel_values, image_grid_thw,
                                  pixel_values_videos, video_grid_thw)
        unencoded = parts if media_in_parts else None
        if not media_in_parts:
            if input_features is not None:
                embeds = scatter_rows(embeds, ids, c.audio_token_index, self.get_audio_features(
                    input_features, feature_attention_mask), "audio")
            if pixel_values is not None:
                embeds = scatter_rows(embeds, ids, c.image_token_index, self.get_image_features(
                    pixel_values, image_grid_thw), "image")
            if pixel_values_videos is not None:
                embeds = scatter_rows(embeds, ids, c.video_token_index, self.get_video_features(
                    pixel_values_videos, video_grid_thw), "video")
        if position_ids is None:
            audio_lengths = None if feature_attention_mask is None else as_numpy(feature_attention_mask).sum(1)
            position_ids, deltas = get_rope_index(
                self.rope_tokens, ids if ids is not None else np.zeros((b, t), np.int64),
                as_numpy(image_grid_thw), as_numpy(video_grid_thw), mask, use_audio_in_video, audio_lengths,
                as_numpy(video_second_per_grid))
            rope_deltas = deltas - (1 - mask).sum(-1, keepdims=True)  # the reference shifts by the padding
        else:
            position_ids = as_numpy(position_ids, np.int64)
            if position_ids.ndim == 2:
                position_ids = np.broadcast_to(position_ids, (3,) + position_ids.shape)
            rope_deltas = position_ids.max(0).max(-1, keepdims=True) + 1 - t
        return PreparedInputs(embeds, position_ids, rope_deltas, mask, unencoded)

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **multimodal):
        """Full-sequence forward without a cache (parity tests, training)."""
        hidden, prepared = self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds, **multimodal)
        return ThinkerOutput(self.lm_head(hidden), hidden, prepared.rope_deltas)

    def hidden_states(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                      **multimodal):
        """The decoder's final hidden states (B, T, H) and the prepared inputs, without the LM head
        (training applies it only where there are labels)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        unknown = sorted(set(multimodal) - set(MULTIMODAL_INPUTS))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) for the Thinker: {', '.join(unknown)}")
        p = self.prepare_inputs(input_ids, attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                                **multimodal)
        hidden = self.model(p.inputs_embeds, Tensor(p.position_ids, ms.int32), Tensor(p.attention_mask, ms.int32))
        return hidden, p
