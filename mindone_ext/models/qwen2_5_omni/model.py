"""The composite Qwen2.5-Omni model: loading from a Hugging Face folder, and generate()."""
import logging

import numpy as np
import mindspore as ms
from mindspore import nn

from ...generation import CompiledDecoder, SamplingConfig, generate_tokens
from ...nn.attention import check_attn_implementation
from ...utils.checkpoint import CheckpointFolder, load_into
from .config import load_config
from .thinker import Qwen2_5OmniThinkerForConditionalGeneration, as_numpy

logger = logging.getLogger(__name__)

SPEECH_PREFIXES = ("talker.", "token2wav.")
# Parts of the checkpoint this release does not run yet; they are left unread (not an error)
# until their issue lands: speech output.
NOT_YET_PORTED = SPEECH_PREFIXES
SUPPORTED_DTYPES = (ms.float32, ms.float16, ms.bfloat16)


class Qwen2_5OmniForConditionalGeneration(nn.Cell):
    def __init__(self, config, dtype=ms.float32, attn_implementation="eager", enable_audio_output=True):
        super().__init__()
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"mindspore_dtype must be one of float32, float16, bfloat16; got {dtype}")
        self.config = config
        self.dtype = dtype
        self.attn_implementation = check_attn_implementation(attn_implementation)
        self.has_talker = bool(enable_audio_output)
        self.thinker = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config, dtype, attn_implementation)
        self.generation_defaults = {}
        self._thinker_runner = None

    @classmethod
    def from_pretrained(cls, path, mindspore_dtype=ms.float32, attn_implementation="eager", enable_audio_output=True):
        """Load a Hugging Face Qwen2.5-Omni folder (config.json + safetensors, single or sharded)."""
        folder = CheckpointFolder(path)
        config = load_config(folder)
        model = cls(config, mindspore_dtype, attn_implementation, enable_audio_output)
        unused = NOT_YET_PORTED if enable_audio_output else [p for p in NOT_YET_PORTED if p not in SPEECH_PREFIXES]
        skipped = sorted({p for k in folder.keys() for p in unused if k.startswith(p)})
        if skipped:
            logger.warning("not loading %s: not ported yet", ", ".join(p.rstrip(".") for p in skipped))
        optional = ["thinker.lm_head.weight"] if model.thinker.tied_word_embeddings else []
        skip = NOT_YET_PORTED if enable_audio_output else NOT_YET_PORTED + SPEECH_PREFIXES
        load_into(model, folder, mindspore_dtype, skip_prefixes=skip, optional=optional)
        model.generation_defaults = folder.read_json("generation_config.json") or {}
        model.set_train(False)
        return model

    # ------------------------------------------------------------------ generation

    def _stop_ids(self, eos_token_id, pad_token_id):
        eos = eos_token_id if eos_token_id is not None else self.generation_defaults.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = pad_token_id if pad_token_id is not None else self.generation_defaults.get("pad_token_id")
        if pad is None:
            pad = eos[0] if eos else 0
        return eos, pad

    def thinker_runner(self):
        if self._thinker_runner is None:
            self._thinker_runner = CompiledDecoder(self.thinker.model, self.thinker.lm_head,
                                                   self.config.thinker_config.text_config)
        return self._thinker_runner

    def generate(self, input_ids=None, attention_mask=None, return_audio=False, max_new_tokens=None,
                 thinker_max_new_tokens=1024, do_sample=False, temperature=1.0, top_k=50, top_p=1.0,
                 repetition_penalty=1.0, eos_token_id=None, pad_token_id=None, seed=None, input_features=None,
                 feature_attention_mask=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                 video_grid_thw=None, use_audio_in_video=False, video_second_per_grid=None, **unused):
        """Generation with the Thinker from what the processor returns. Returns token ids
        (B, prompt + new) as int64 numpy, like the reference's `generate(..., return_audio=False)`."""
        if return_audio:
            raise NotImplementedError("speech output (return_audio=True) is not available in this release yet")
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        ids = as_numpy(input_ids, np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {ids.shape}")
        mask = np.ones_like(ids, np.int32) if attention_mask is None else as_numpy(attention_mask, np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        if mask.shape[1] and (mask[:, -1] == 0).any():
            raise ValueError("batched prompts must be left padded (attention_mask is 0 on the last position)")
        max_new = max_new_tokens if max_new_tokens is not None else thinker_max_new_tokens
        limit = self.config.thinker_config.text_config.max_position_embeddings
        if ids.shape[1] + max_new > limit:
            raise ValueError(f"prompt of {ids.shape[1]} tokens + {max_new} new tokens exceeds the context "
                             f"length {limit}")
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        eos, pad = self._stop_ids(eos_token_id, pad_token_id)

        prompt = self.thinker.prepare_inputs(
            ids, mask, input_features=input_features, feature_attention_mask=feature_attention_mask,
            pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw, use_audio_in_video=use_audio_in_video,
            video_second_per_grid=video_second_per_grid)
        runner = self.thinker_runner()
        cache = runner.allocate(ids.shape[0], ids.shape[1] + max_new, self.thinker.model.embed_tokens.weight.dtype)
        try:
            new = generate_tokens(runner, cache, prompt.inputs_embeds, ids, mask, prompt.position_ids,
                                  prompt.rope_deltas, max_new, sampling, eos, pad)
        finally:
            cache.release()
        return np.concatenate([ids, new], 1)
