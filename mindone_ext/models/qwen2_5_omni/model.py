"""The composite Qwen2.5-Omni model: loading from a Hugging Face folder, and generate()."""
import inspect

import numpy as np
import mindspore as ms
from mindspore import nn

from ... import bundled
from ...generation import CompiledDecoder, SamplingConfig, TokenLookup, TokenLoop
from ...nn.attention import check_attn_implementation
from ...nn.device import keep_dtypes_exact
from ...nn.lora import PEFT_PREFIX, adapter_tensor_names, load_adapter
from ...utils.checkpoint import CheckpointFolder, load_into
from ...utils.export import saved_dtype
from . import speech
from .answer import Answer, AnswerRequest, stream
from .config import load_config
from .speakers import check_speakers, folder_speaker_file, no_speakers_message, read_speaker_file
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
        self.name_or_path = None
        self.speakers = {}
        self.thinker_max_new_tokens = bundled.RELEASE_THINKER_TOKENS
        self.talker_max_new_tokens = speech.TALKER_DEFAULTS["max_new_tokens"]
        self._thinker_runner = self._talker_runner = None

    @classmethod
    def from_pretrained(cls, path, mindspore_dtype=ms.float32, attn_implementation="eager", enable_audio_output=True,
                        device_map=None, use_safetensors=None):
        """Load a Hugging Face Qwen2.5-Omni folder (config.json + safetensors, single or sharded).
        `mindspore_dtype="auto"` keeps the checkpoint's dtype. `device_map` and
        `use_safetensors` are accepted for snippets written for transformers and mindone and
        change nothing: MindSpore runs on its context's device (`mindspore.set_context(
        device_target=...)`), and weights are always read from safetensors."""
        keep_dtypes_exact()  # before any weight is on the card
        folder = CheckpointFolder(path)
        config = load_config(folder)
        if mindspore_dtype is None or mindspore_dtype == "auto":
            mindspore_dtype = getattr(ms, saved_dtype(folder.read_json("config.json") or {}, folder)
                                      if mindspore_dtype == "auto" else "float32")
        model = cls(config, mindspore_dtype, attn_implementation, enable_audio_output)
        stored = {name for name, _ in model.stored_parameters()}
        optional = [name for name, _ in model.parameters_and_names() if name not in stored]
        load_into(model, folder, mindspore_dtype, skip_prefixes=() if enable_audio_output else SPEECH_PREFIXES,
                  optional=optional)
        model.generation_defaults = folder.read_json("generation_config.json") or {}
        model.name_or_path = folder.path
        model.thinker_max_new_tokens = bundled.thinker_max_new_tokens(folder.path)
        model.talker_max_new_tokens = bundled.talker_max_new_tokens(folder.path)
        speaker_file = folder_speaker_file(folder.path) if enable_audio_output else None
        if speaker_file:
            model.load_speakers(speaker_file)  # checked against the Token2Wav's sizes
        model.set_train(False)
        return model

    def disable_talker(self):
        """Drop the speech modules (Talker, Token2Wav) and the speakers, freeing their memory, as the
        reference's `disable_talker` (the model cards call it after loading when no speech is
        wanted: ~2 GB on the 7B). generate then answers in text; return_audio=True is refused."""
        for name in ("talker", "token2wav"):
            if hasattr(self, name):
                delattr(self, name)
        self.has_talker, self.speakers, self._talker_runner = False, {}, None

    def load_speakers(self, path):
        """Add (or replace) voices from a speaker file, as the reference's `load_speakers` does with
        a `spk_dict.pt`: .safetensors, .zip (the existing port's), .npy or .pt (needs torch; see
        speakers.py). Each is checked against this Token2Wav's sizes first. Returns their names."""
        if not self.has_talker:
            raise ValueError("speakers need the speech modules: load with enable_audio_output=True")
        dit = self.config.token2wav_config.dit_config
        found = check_speakers(read_speaker_file(path), dit.enc_emb_dim, dit.mel_dim, path)
        self.speakers = {**self.speakers, **found}
        return sorted(found)

    def stored_parameters(self):
        """(name, parameter) of every weight a checkpoint holds: all but the Thinker's LM head when
        it is tied to the embedding (stored once, as the embedding; the reference ties it back)."""
        tied = self.thinker.tied_word_embeddings
        return [(name, p) for name, p in self.parameters_and_names() if not (tied and name == "thinker.lm_head.weight")]

    def load_adapter(self, folder):
        """Apply a LoRA adapter folder (ours, or PEFT's): one trained on the whole model names its
        layers `thinker.model...`, one trained on the Thinker alone (our fine-tuning scripts, PEFT on
        Qwen2_5OmniThinkerForConditionalGeneration) `model...`. Returns the cell it was applied to."""
        whole = any(k.startswith(PEFT_PREFIX + "thinker.") for k in adapter_tensor_names(folder))
        target = self if whole else self.thinker
        load_adapter(target, folder)
        return target

    def save_pretrained(self, out_dir, dtype=None, max_shard_size="5GB", overwrite=False, source=None):
        """A Hugging Face folder the PyTorch reference loads (see saving.save_pretrained)."""
        from .saving import save_pretrained

        return save_pretrained(self, out_dir, dtype, max_shard_size, overwrite, source)

    # ------------------------------------------------------------------ generation

    def _stop_ids(self, eos_token_id, pad_token_id):
        eos = eos_token_id if eos_token_id is not None else self.generation_defaults.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = pad_token_id if pad_token_id is not None else self.generation_defaults.get("pad_token_id")
        if pad is None:
            pad = eos[0] if eos else 0
        return eos, pad

    @property
    def device(self):
        """Where MindSpore runs ("CPU", "Ascend", ...): what snippets pass to `inputs.to(model.device)`."""
        return ms.get_context("device_target")

    @property
    def stop_token_ids(self):
        """The tokens that end an answer (the generation config's eos_token_id)."""
        return self._stop_ids(None, None)[0]

    @property
    def samples_per_codec_token(self):
        """Waveform samples per Talker codec token: mel frames per code x vocoder hop."""
        c = self.config.token2wav_config
        return c.dit_config.repeats * int(np.prod(c.bigvgan_config.upsample_rates))

    def thinker_runner(self):
        if self._thinker_runner is None:
            self._thinker_runner = CompiledDecoder(self.thinker.model, self.thinker.lm_head,
                                                   self.config.thinker_config.text_config, name="Thinker")
        return self._thinker_runner

    def talker_runner(self):
        if self._talker_runner is None:
            self._talker_runner = speech.talker_runner(self.talker)
        return self._talker_runner

    def speaker(self, name):
        if not self.speakers:
            raise ValueError(no_speakers_message(self.name_or_path or "this checkpoint"))
        if name not in self.speakers:
            raise ValueError(f"unknown speaker {name!r}; available: {', '.join(sorted(self.speakers))}")
        return self.speakers[name]

    def generate(self, input_ids=None, attention_mask=None, speaker="Chelsie", spk=None, return_audio=None,
                 use_audio_in_video=False, max_new_tokens=None, thinker_max_new_tokens=None, do_sample=False,
                 temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, eos_token_id=None, pad_token_id=None,
                 seed=None, input_features=None, feature_attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, video_second_per_grid=None, **kwargs):
        """Generate from what the processor returns (numpy arrays or mindspore.Tensor, any int
        or float dtype), like the reference's `generate`: token ids (B, prompt + new) as an int64
        mindspore.Tensor, and with `return_audio` (default: when the model was loaded with audio
        output) also the 24 kHz waveform, a float32 mindspore.Tensor (samples,).

        Sampling arguments without a prefix (or with `thinker_`) drive the Thinker; `talker_*`
        ones the Talker (defaults: the reference's, sampling with top_k=40, top_p=0.8,
        temperature=0.9, repetition_penalty=1.05); `token2wav_*` the ODE (`num_steps`,
        `guidance_scale`, `sway_coefficient`, `noise`). `speaker` and `spk` both name the voice.
        Answers stop after 1024 text tokens and 4096 codec tokens, as in the reference (64 and 100
        on the bundled tiny checkpoint, whose random weights never stop by themselves), unless
        `max_new_tokens` / `talker_max_new_tokens` say otherwise."""
        request = self.plan_answer(locals(), kwargs)
        runner = self.thinker_runner()
        cache = runner.allocate(request.ids.shape[0], request.ids.shape[1] + request.max_new, self.cache_dtype)
        try:
            prompt = request.prompt
            logits, hidden = runner.prefill(cache, prompt.inputs_embeds, prompt.position_ids, request.mask)
            steps = list(self.thinker_loop(request, cache).run(logits, hidden, prompt.inputs_embeds))
        finally:
            cache.release()
        new = np.stack([s.tokens for s in steps], 1) if steps else np.zeros((request.ids.shape[0], 0), np.int64)
        sequences = ms.Tensor(np.concatenate([request.ids, new], 1))
        if not request.return_audio:
            return sequences
        return sequences, ms.Tensor(self._speak(request, steps))

    def generate_stream(self, tokenizer=None, chunking=None, **kwargs):
        """`generate`'s arguments (batch size 1); returns a generator of events in the order they
        are ready: `TextDelta(token_id, text)` per Thinker token (text decoded with `tokenizer`
        when given, never splitting a character) and, with audio, `AudioChunk(audio)` pieces of the
        24 kHz waveform while the Thinker is still talking. `chunking` (a `StreamChunking`) sets
        the Token2Wav chunk and context sizes. Joined, the text equals `generate`'s and the audio
        is its waveform to within the chunking's error (README). Closing the generator frees the
        caches; the model stays usable."""
        return stream(self.answer(tokenizer, chunking, **kwargs))

    def answer(self, tokenizer=None, chunking=None, cache=None, record=None, prepared=None, talker_cache=None,
               **kwargs):
        """generate_stream's answer as an explicit pipeline (answer.Answer), for a caller that runs
        the decode steps itself (the voice server batches those of many answers). `cache` and
        `prepared`: a conversation whose prompt is in that cache already; `record` (a list)
        receives the Thinker's steps; `talker_cache`: the conversation's KeptTalkerCache, if it keeps one."""
        args = self.bind_generate_args(kwargs)
        request = self.plan_answer(args, args.pop("kwargs"), prepared, media_in_parts=True)
        if request.ids.shape[0] != 1:
            raise ValueError(f"generate_stream streams one conversation (batch size 1); got a batch of "
                             f"{request.ids.shape[0]}")
        return Answer(self, request, tokenizer, chunking, cache, record, talker_cache)

    def bind_generate_args(self, kwargs):
        """Keyword arguments -> all of generate()'s parameters (defaults filled in, extras in "kwargs")."""
        bound = inspect.signature(self.generate).bind(**kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        args["kwargs"] = dict(args.get("kwargs", {}))
        return args

    def plan_answer(self, args, kwargs, prepared=None, media_in_parts=False):
        """generate()'s arguments (`args`, and the extra `kwargs`) checked and sorted into an
        AnswerRequest. `prepared`: the prompt's inputs when they are already in a cache (a
        ConversationSession's, whose `media` tells the Talker where audio was). `media_in_parts`:
        the media are encoded when the answer starts, in parts (Answer.start_steps)."""
        prefixed = {p: {k[len(p) + 1:]: kwargs.pop(k) for k in list(kwargs) if k.startswith(p + "_")}
                    for p in ("thinker", "talker", "token2wav")}
        sampling_keys = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                         "eos_token_id", "pad_token_id"}
        unknown = sorted(set(kwargs) | {f"{p}_{k}" for p in ("thinker", "talker") for k in prefixed[p]
                                        if k not in sampling_keys})
        if unknown:
            raise TypeError(f"generate() got unsupported arguments: {', '.join(unknown)}")
        return_audio = self.has_talker if args["return_audio"] is None else args["return_audio"]
        if return_audio and not self.has_talker:
            raise ValueError("return_audio=True needs the speech modules: load with enable_audio_output=True "
                             "(and do not call disable_talker())")
        if args["input_ids"] is None:
            raise ValueError("generate() needs input_ids")
        ids = as_numpy(args["input_ids"], np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {ids.shape}")
        if return_audio and ids.shape[0] != 1:
            raise ValueError("audio output is generated for one conversation at a time (batch size 1), as in the "
                             f"reference; got a batch of {ids.shape[0]}: pass return_audio=False for a batch's text")
        voice = self.speaker(args["spk"] or args["speaker"]) if return_audio else None
        mask = (np.ones_like(ids, np.int32) if args["attention_mask"] is None
                else as_numpy(args["attention_mask"], np.int32))
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        if mask.shape[1] and (mask[:, -1] == 0).any():
            raise ValueError("batched prompts must be left padded (attention_mask is 0 on the last position)")
        given = [n for n in (args["max_new_tokens"], args["thinker_max_new_tokens"]) if n is not None]
        max_new = prefixed["thinker"].pop("max_new_tokens", given[0] if given else self.thinker_max_new_tokens)
        limit = self.config.thinker_config.text_config.max_position_embeddings
        if ids.shape[1] + max_new > limit:
            raise ValueError(f"prompt of {ids.shape[1]} tokens + {max_new} new tokens exceeds the context "
                             f"length {limit}")
        settings = {k: args[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                                         "eos_token_id", "pad_token_id")}
        settings.update(prefixed["thinker"])
        eos, pad = self._stop_ids(settings["eos_token_id"], settings["pad_token_id"])
        if prepared is not None:
            media = prepared.media
        else:
            media = {k: args[k] for k in ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
                                          "pixel_values_videos", "video_grid_thw", "video_second_per_grid")
                     if args[k] is not None}
            prepared = self.thinker.prepare_inputs(ids, mask, use_audio_in_video=args["use_audio_in_video"],
                                                   media_in_parts=media_in_parts, **media)
        return AnswerRequest(ids, mask, prepared, media, max_new, SamplingConfig.from_settings(settings, args["seed"]),
                             eos, pad, return_audio, voice, args["seed"], args["use_audio_in_video"],
                             prefixed["talker"], prefixed["token2wav"])

    @property
    def cache_dtype(self):
        """The dtype of the Thinker's and Talker's KV caches: the weights'."""
        return self.thinker.model.embed_tokens.weight.dtype

    def thinker_loop(self, request, cache):
        """The Thinker's token loop (generation.TokenLoop) for `request` over `cache`."""
        return TokenLoop(self.thinker_runner(), cache, request.ids, request.prompt.rope_deltas, request.max_new,
                         request.sampling, request.eos, request.pad,
                         lambda step, tokens: TokenLookup(self.thinker.model.embed_tokens, tokens[:, None]))

    def talker_prompt(self, request, first_step, second_step):
        """The Talker's prompt (speech.TalkerPrompt) from the Thinker's first two steps: the
        prompt's states and the first answer token's."""
        return speech.TalkerPrompt(
            self.talker, self.thinker, request.ids,
            speech.zero_media_positions(first_step.embeds, request.ids, self.config.thinker_config, request.media),
            first_step.hidden, int(first_step.tokens[0]), second_step.embeds, second_step.hidden,
            request.voice.bos_token)

    def codec_loop(self, request, talker_prompt, kept=None):
        """The Talker's codec token loop (speech.CodecLoop) for `talker_prompt`, over `kept`'s
        cache (a conversation's speech.KeptTalkerCache) when given."""
        settings = {**speech.TALKER_DEFAULTS, "max_new_tokens": self.talker_max_new_tokens, **request.talker_args}
        positions, deltas = speech.talker_positions(self.config.talker_config, talker_prompt, request.media,
                                                    request.use_audio_in_video)
        return speech.CodecLoop(self.talker, self.talker_runner(), talker_prompt, positions, deltas, settings,
                                None if request.seed is None else request.seed + 1, kept)

    def _speak(self, request, steps):
        if len(steps) < 2:  # nothing was said before the stop token
            return np.zeros(0, np.float32)
        talker_prompt = self.talker_prompt(request, steps[0], steps[1])
        for step in steps[2:]:
            talker_prompt.add_reply(step.embeds, step.hidden)
        talker_prompt.finish()
        codes = np.asarray(list(self.codec_loop(request, talker_prompt).codes())[:-1], np.int64)  # the stop token dropped
        if len(codes) == 0:
            return np.zeros(0, np.float32)
        wav = self.token2wav(codes[None], request.voice.cond, request.voice.ref_mel, seed=request.seed,
                             **request.token2wav_args)
        return wav.asnumpy().astype(np.float32).reshape(-1)
