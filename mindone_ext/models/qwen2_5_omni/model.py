"""The composite Qwen2.5-Omni model: loading from a Hugging Face folder, and generate()."""
import numpy as np
import mindspore as ms
from mindspore import nn

from ...generation import CompiledDecoder, SamplingConfig, iter_tokens
from ...nn.attention import check_attn_implementation
from ...utils.checkpoint import CheckpointFolder, load_into
from . import speech
from .config import load_config
from .speakers import load_speakers
from .talker import Qwen2_5OmniTalkerForConditionalGeneration
from .thinker import Qwen2_5OmniThinkerForConditionalGeneration, as_numpy
from .token2wav import Qwen2_5OmniToken2WavModel

SPEECH_PREFIXES = ("talker.", "token2wav.")
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
        if self.has_talker:
            self.talker = Qwen2_5OmniTalkerForConditionalGeneration(config.talker_config, dtype, attn_implementation)
            self.token2wav = Qwen2_5OmniToken2WavModel(config.token2wav_config)
        self.generation_defaults = {}
        self.speakers = {}
        self._thinker_runner = self._talker_runner = None

    @classmethod
    def from_pretrained(cls, path, mindspore_dtype=ms.float32, attn_implementation="eager", enable_audio_output=True):
        """Load a Hugging Face Qwen2.5-Omni folder (config.json + safetensors, single or sharded)."""
        folder = CheckpointFolder(path)
        config = load_config(folder)
        model = cls(config, mindspore_dtype, attn_implementation, enable_audio_output)
        optional = ["thinker.lm_head.weight"] if model.thinker.tied_word_embeddings else []
        load_into(model, folder, mindspore_dtype, skip_prefixes=() if enable_audio_output else SPEECH_PREFIXES,
                  optional=optional)
        model.generation_defaults = folder.read_json("generation_config.json") or {}
        if enable_audio_output:
            model.speakers = load_speakers(folder.path)
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

    @property
    def samples_per_codec_token(self):
        """Waveform samples per Talker codec token: mel frames per code x vocoder hop."""
        c = self.config.token2wav_config
        return c.dit_config.repeats * int(np.prod(c.bigvgan_config.upsample_rates))

    def thinker_runner(self):
        if self._thinker_runner is None:
            self._thinker_runner = CompiledDecoder(self.thinker.model, self.thinker.lm_head,
                                                   self.config.thinker_config.text_config)
        return self._thinker_runner

    def talker_runner(self):
        if self._talker_runner is None:
            self._talker_runner = speech.talker_runner(self.talker)
        return self._talker_runner

    def speaker(self, name):
        if not self.speakers:
            raise ValueError("this checkpoint has no speakers: convert its spk_dict.pt with "
                             "tools/convert/convert_spk_dict_pt2np.py (or install torch to read it directly)")
        if name not in self.speakers:
            raise ValueError(f"unknown speaker {name!r}; available: {', '.join(sorted(self.speakers))}")
        return self.speakers[name]

    def generate(self, input_ids=None, attention_mask=None, speaker="Chelsie", spk=None, return_audio=None,
                 use_audio_in_video=False, max_new_tokens=None, thinker_max_new_tokens=1024, do_sample=False,
                 temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, eos_token_id=None, pad_token_id=None,
                 seed=None, input_features=None, feature_attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, video_second_per_grid=None, **kwargs):
        """Generate from what the processor returns, like the reference's `generate`: token ids
        (B, prompt + new) as int64 numpy, and with `return_audio` (default: when the model was
        loaded with audio output) also the 24 kHz waveform as float32 numpy.

        Sampling arguments without a prefix (or with `thinker_`) drive the Thinker; `talker_*`
        ones the Talker (defaults: the reference's, sampling with top_k=40, top_p=0.8,
        temperature=0.9, repetition_penalty=1.05); `token2wav_*` the ODE (`num_steps`,
        `guidance_scale`, `sway_coefficient`, `noise`). `speaker` and `spk` both name the voice."""
        thinker_args = {k[len("thinker_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("thinker_")}
        talker_args = {k[len("talker_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("talker_")}
        token2wav_args = {k[len("token2wav_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("token2wav_")}
        sampling_keys = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                         "eos_token_id", "pad_token_id"}
        unknown = sorted(set(kwargs) | {f"thinker_{k}" for k in set(thinker_args) - sampling_keys}
                         | {f"talker_{k}" for k in set(talker_args) - sampling_keys})
        if unknown:
            raise TypeError(f"generate() got unsupported arguments: {', '.join(unknown)}")
        if return_audio is None:
            return_audio = self.has_talker
        if return_audio and not self.has_talker:
            raise ValueError("return_audio=True needs the speech modules: load with enable_audio_output=True")
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        ids = as_numpy(input_ids, np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {ids.shape}")
        if return_audio and ids.shape[0] != 1:
            raise ValueError("audio output is generated for one conversation at a time (batch size 1), as in the "
                             f"reference; got a batch of {ids.shape[0]}")
        voice = self.speaker(spk or speaker) if return_audio else None
        mask = np.ones_like(ids, np.int32) if attention_mask is None else as_numpy(attention_mask, np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        if mask.shape[1] and (mask[:, -1] == 0).any():
            raise ValueError("batched prompts must be left padded (attention_mask is 0 on the last position)")
        max_new = thinker_args.pop("max_new_tokens", max_new_tokens if max_new_tokens is not None
                                   else thinker_max_new_tokens)
        limit = self.config.thinker_config.text_config.max_position_embeddings
        if ids.shape[1] + max_new > limit:
            raise ValueError(f"prompt of {ids.shape[1]} tokens + {max_new} new tokens exceeds the context "
                             f"length {limit}")
        settings = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        settings.update(thinker_args)
        sampling = SamplingConfig.from_settings(settings, seed)
        eos, pad = self._stop_ids(settings["eos_token_id"], settings["pad_token_id"])

        media = {k: v for k, v in dict(input_features=input_features, feature_attention_mask=feature_attention_mask,
                                       pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                       pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                                       video_second_per_grid=video_second_per_grid).items() if v is not None}
        prompt = self.thinker.prepare_inputs(ids, mask, use_audio_in_video=use_audio_in_video, **media)
        runner = self.thinker_runner()
        cache = runner.allocate(ids.shape[0], ids.shape[1] + max_new, self.thinker.model.embed_tokens.weight.dtype)
        try:
            steps = list(iter_tokens(runner, cache, prompt.inputs_embeds, ids, mask, prompt.position_ids,
                                     prompt.rope_deltas, max_new, sampling, eos, pad,
                                     lambda step, tokens: self.thinker.embed(tokens[:, None])))
        finally:
            cache.release()
        new = np.stack([t for t, _, _ in steps], 1) if steps else np.zeros((ids.shape[0], 0), np.int64)
        sequences = np.concatenate([ids, new], 1)
        if not return_audio:
            return sequences
        return sequences, self._speak(ids, prompt, steps, voice, media, use_audio_in_video, talker_args,
                                      token2wav_args, seed)

    def _speak(self, ids, prompt, steps, voice, media, use_audio_in_video, talker_args, token2wav_args, seed):
        if len(steps) < 2:  # nothing was said before the stop token
            return np.zeros(0, np.float32)
        settings = {**speech.TALKER_DEFAULTS, **talker_args}
        _, prompt_embeds, prompt_hidden = steps[0]
        talker_prompt = speech.TalkerPrompt(
            self.talker, self.thinker, ids,
            speech.zero_media_positions(prompt_embeds, ids, self.config.thinker_config, media), prompt_hidden,
            int(steps[0][0][0]), [e for _, e, _ in steps[1:]], [h for _, _, h in steps[1:]],
            voice.bos_token)
        positions, deltas = speech.talker_positions(self.config.talker_config, talker_prompt, media, use_audio_in_video)
        codes = speech.generate_codes(self.talker, self.talker_runner(), talker_prompt, positions, deltas, settings,
                                      None if seed is None else seed + 1)
        if len(codes) == 0:
            return np.zeros(0, np.float32)
        wav = self.token2wav(codes[None], voice.cond, voice.ref_mel, seed=seed, **token2wav_args)
        return wav.asnumpy().astype(np.float32).reshape(-1)
