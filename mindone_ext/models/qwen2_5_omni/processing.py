"""`Qwen2_5OmniProcessor` without torch: chat template and tokenizer, Whisper log-mel features
from transformers (its numpy code; its torch code when it sees torch installed, as the reference's
processor then does), and our own numpy image and video patching, computed as the
reference's processors compute them (transformers' torchvision-based Qwen2VLImageProcessorFast
and Qwen2VLVideoProcessor, which Qwen2.5-Omni's processor loads by default). Returns numpy
arrays that feed `model.generate` directly, with the placeholder tokens expanded exactly as the
reference does.
"""
import json
import os
import re

import numpy as np
from transformers import AutoTokenizer, WhisperFeatureExtractor

from ...utils.batch_feature import BatchFeature, check_tensor_type
from ...utils.resize import resize
from ...utils.small_pages import on_small_pages
from .audio_features import window_features
from .rope_index import chunk_bounds
from .sizing import smart_resize

PATCHING = dict(patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=[0.48145466, 0.4578275, 0.40821073],
                image_std=[0.26862954, 0.26130258, 0.27577711], rescale_factor=1 / 255)
IMAGE_PIXELS = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)  # the image processor's, unless configured
VIDEO_PIXELS = dict(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)  # the video processor's, always
HUB_ARGUMENTS = {"use_fast", "trust_remote_code", "local_files_only", "revision", "cache_dir", "token"}


class PatchPreprocessor:
    """An image (H, W, 3) or a video's frames (T, H, W, 3) / (T, 3, H, W) -> patches
    (t * h * w, 3 * temporal_patch * patch * patch) and grid (t, h, w), as Qwen2-VL's processors
    make them: resized to multiples of patch * merge within the pixel budget (uint8 input by the
    uint8 kernel, float input by the float one, as torchvision does), rescaled and normalised in
    one step ((x - mean / scale) / (std / scale), in float32, bit-exact), padded to a whole temporal patch
    with the last frame (an image is one frame)."""

    def __init__(self, min_pixels, max_pixels, **config):
        c = {**PATCHING, **{k: v for k, v in config.items() if k in PATCHING}}
        self.__dict__.update(c, min_pixels=min_pixels, max_pixels=max_pixels)
        # fused as the reference fuses them: float32 mean and std times float32(1 / rescale_factor)
        self.mean = np.asarray(self.image_mean, np.float32) * np.float32(1.0 / self.rescale_factor)
        self.std = np.asarray(self.image_std, np.float32) * np.float32(1.0 / self.rescale_factor)

    @on_small_pages
    def __call__(self, frames):
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or 3 not in (frames.shape[1], frames.shape[-1]):
            raise ValueError("an image must be (H, W, 3) and a video's frames (T, H, W, 3) or (T, 3, H, W); "
                             f"got shape {frames.shape}")
        if frames.shape[1] == 3 and frames.shape[-1] != 3:
            frames = frames.transpose(0, 2, 3, 1)
        factor = self.patch_size * self.merge_size
        height, width = smart_resize(frames.shape[1], frames.shape[2], factor, self.min_pixels, self.max_pixels)
        tp, c = self.temporal_patch_size, frames.shape[-1]
        t = -(-len(frames) // tp)  # temporal patches, the last one padded with the last frame
        gh, gw, m, p = height // self.patch_size, width // self.patch_size, self.merge_size, self.patch_size
        patches = np.empty((t, gh * gw, c * tp * p * p), np.float32)
        # One temporal patch at a time: over a whole video at once the transposed reads fall out of
        # the cache (5.7 s against 0.5 s for 120 frames of 560 x 1008), and memory holds the
        # patches and one step's temporaries
        for step in range(t):
            x = np.stack([self._normalized(frames[min(i, len(frames) - 1)], height, width)
                          for i in range(step * tp, (step + 1) * tp)])  # (tp, H, W, C)
            x = x.reshape(tp, gh // m, m, p, gw // m, m, p, c).transpose(1, 4, 2, 5, 7, 0, 3, 6)
            patches[step].reshape(x.shape)[...] = x  # merge groups, their patches, channels, time, rows
        return patches.reshape(t * gh * gw, c * tp * p * p), np.array([t, gh, gw])

    def _normalized(self, frame, height, width):
        """A frame (H, W, C) at height x width, rescaled and normalised (float32)."""
        if frame.dtype != np.uint8:
            frame = frame.astype(np.float32, copy=False)
        if (height, width) != frame.shape[:2]:
            frame = resize(frame, height, width)
        return (frame.astype(np.float32, copy=False) - self.mean) / self.std

    def batch(self, items):
        """Several images or videos -> (their patches, concatenated; their grids (n, 3))."""
        processed = [self(item) for item in items]
        return np.concatenate([p for p, _ in processed]), np.stack([g for _, g in processed]).astype(np.int64)


def as_pixels(image):
    """A PIL image (converted to RGB, as the reference's processor converts it: alpha dropped) or
    an array, as an array."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


class Qwen2_5OmniProcessor:
    audio_token, image_token, video_token = "<|AUDIO|>", "<|IMAGE|>", "<|VIDEO|>"
    vision_bos_token, vision_eos_token = "<|vision_bos|>", "<|vision_eos|>"
    audio_bos_token, audio_eos_token = "<|audio_bos|>", "<|audio_eos|>"

    def __init__(self, tokenizer, feature_extractor, image_processor, video_processor, chat_template=None,
                 position_id_per_seconds=25, seconds_per_chunk=2.0):
        self.tokenizer, self.feature_extractor = tokenizer, feature_extractor
        self.image_processor, self.video_processor = image_processor, video_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.position_id_per_seconds, self.seconds_per_chunk = position_id_per_seconds, seconds_per_chunk

    @classmethod
    def from_pretrained(cls, path, min_pixels=None, max_pixels=None, **ignored):
        """`min_pixels` / `max_pixels` set the image budget, as in the reference (its video
        processor keeps its own); hub arguments such as `use_fast` or `trust_remote_code` mean
        nothing for a local folder and are ignored."""
        unknown = sorted(set(ignored) - HUB_ARGUMENTS)
        if unknown:
            raise TypeError(f"Qwen2_5OmniProcessor.from_pretrained() got unexpected arguments: {', '.join(unknown)}")
        if not os.path.isdir(path):
            raise ValueError(f"processor folder {path!r} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(path)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(path)
        config = {}
        if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            with open(os.path.join(path, "preprocessor_config.json")) as f:
                config = json.load(f)
        size = config.get("size") or {}
        image_pixels = dict(min_pixels=config.get("min_pixels", size.get("shortest_edge", IMAGE_PIXELS["min_pixels"])),
                            max_pixels=config.get("max_pixels", size.get("longest_edge", IMAGE_PIXELS["max_pixels"])))
        image_pixels.update({k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None})
        # the reference's video processor keeps its own pixel budget whatever the files say
        template = None
        if os.path.isfile(os.path.join(path, "chat_template.json")):
            with open(os.path.join(path, "chat_template.json")) as f:
                template = json.load(f).get("chat_template")
        patching = {k: config[k] for k in PATCHING if k in config}
        return cls(tokenizer, feature_extractor, PatchPreprocessor(**image_pixels, **patching),
                   PatchPreprocessor(**VIDEO_PIXELS, **patching), template)

    def apply_chat_template(self, conversation, add_generation_prompt=True, tokenize=False, return_dict=False,
                            load_audio_from_video=False, fps=None, num_frames=None, **kwargs):
        """The prompt text; with `tokenize=True`, the conversation's media are also loaded (as
        transformers' processor loads them, see chat_inputs) and everything is processed: the
        model's inputs (a BatchFeature with `return_dict=True`, else the input ids). Other
        arguments (`return_tensors`, `padding`, `use_audio_in_video`, ...) go to the processor."""
        if not tokenize:
            return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        from .chat_inputs import gather, load_videos

        batch = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batch else [conversation]
        text = [self.tokenizer.apply_chat_template(c, chat_template=self.chat_template, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt) for c in conversations]
        images, videos, audios = gather(conversations, load_audio_from_video)
        images = [i for per_conversation in images for i in per_conversation]
        videos = load_videos([v for per_conversation in videos for v in per_conversation], fps, num_frames)
        out = self(text, audio=audios or None, images=images or None, videos=videos or None,
                   **({} if fps is None else {"fps": fps}), **kwargs)
        return out if return_dict else out["input_ids"]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def __call__(self, text, audio=None, images=None, videos=None, use_audio_in_video=False, fps=2.0,
                 padding=True, return_tensors="np", **unused):
        """A BatchFeature of the model's inputs: numpy arrays (`return_tensors="np"`, the
        default) or mindspore.Tensor (`"ms"`)."""
        check_tensor_type(return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        audio_lengths = []
        if audio is not None:
            audio = [audio] if isinstance(audio, np.ndarray) else list(audio)
            out["input_features"], out["feature_attention_mask"] = window_features(self.feature_extractor, audio)
            frames = out["feature_attention_mask"].sum(-1)
            audio_lengths = ((frames - 1) // 2 + 1 - 2) // 2 + 1
        image_grids = []
        if images is not None:
            one = hasattr(images, "convert") or (isinstance(images, np.ndarray) and images.ndim == 3)
            images = [images] if one else images
            out["pixel_values"], out["image_grid_thw"] = self.image_processor.batch([as_pixels(i) for i in images])
            image_grids = out["image_grid_thw"]
        video_grids, seconds = [], []
        if videos is not None:
            videos = [[as_pixels(f) for f in v] if isinstance(v, (list, tuple)) else v for v in videos]
            out["pixel_values_videos"], out["video_grid_thw"] = self.video_processor.batch(videos)
            video_grids = out["video_grid_thw"]
            rates = fps if isinstance(fps, (list, tuple)) else [fps] * len(videos)
            seconds = [self.video_processor.temporal_patch_size / r for r in rates]
            out["video_second_per_grid"] = np.asarray(seconds, np.float32)
        texts = self.expand_placeholders(texts, iter(audio_lengths), iter(image_grids), iter(video_grids),
                                         iter(seconds), use_audio_in_video)
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer(texts, padding=padding, return_tensors="np")
        out["input_ids"] = encoded["input_ids"].astype(np.int64)
        out["attention_mask"] = encoded["attention_mask"].astype(np.int64)
        return BatchFeature(out, return_tensors)

    def expand_placeholders(self, texts, audio_lengths, image_grids, video_grids, seconds, use_audio_in_video):
        """Each <|AUDIO|>/<|IMAGE|>/<|VIDEO|> becomes as many tokens as its features; with
        `use_audio_in_video` a video block interleaves its frames and audio in time chunks."""
        merge = self.image_processor.merge_size ** 2
        hold = {"audio": "<|audio_placeholder|>", "image": "<|image_placeholder|>", "video": "<|video_placeholder|>"}
        done = []
        for sample in texts:
            pattern = "|".join(re.escape(t) for t in (self.audio_token, self.image_token, self.video_token))
            for token in [m.group() for m in re.finditer(pattern, sample)]:
                try:
                    if token == self.audio_token:
                        sample = sample.replace(token, hold["audio"] * int(next(audio_lengths)), 1)
                    elif token == self.image_token:
                        sample = sample.replace(token, hold["image"] * int(np.prod(next(image_grids)) // merge), 1)
                    elif not use_audio_in_video:
                        sample = sample.replace(token, hold["video"] * int(np.prod(next(video_grids)) // merge), 1)
                    else:
                        block = self._audio_video_block(int(next(audio_lengths)), next(video_grids), next(seconds), hold)
                        sample = sample.replace(self.vision_bos_token + token + self.vision_eos_token, block, 1)
                except StopIteration:
                    raise ValueError(f"the text has more {token} placeholders than media were given") from None
            for kind, token in (("audio", self.audio_token), ("image", self.image_token), ("video", self.video_token)):
                sample = sample.replace(hold[kind], token)
            done.append(sample)
        return done

    def _audio_video_block(self, n_audio, grid, seconds, hold):
        t, h, w = (int(v) for v in grid)
        m = self.video_processor.merge_size
        video_times = np.repeat(np.arange(t), (h // m) * (w // m)) * seconds * self.position_id_per_seconds
        per_chunk = int(self.position_id_per_seconds * self.seconds_per_chunk)
        video_chunks = chunk_bounds(video_times, per_chunk)
        audio_chunks = chunk_bounds(np.arange(n_audio), per_chunk)
        block = self.vision_bos_token + self.audio_bos_token
        for j in range(max(len(video_chunks), len(audio_chunks))):
            if j < len(video_chunks):
                block += hold["video"] * (video_chunks[j][1] - video_chunks[j][0])
            if j < len(audio_chunks):
                block += hold["audio"] * (audio_chunks[j][1] - audio_chunks[j][0])
        return block + self.audio_eos_token + self.vision_eos_token

