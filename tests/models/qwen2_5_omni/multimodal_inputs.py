"""Multimodal prompts built the way the reference processor builds them (its own placeholder
expansion code), with random features of the right shapes, for parity tests."""
from types import SimpleNamespace

import numpy as np
from transformers import AutoTokenizer, Qwen2_5OmniProcessor

MEL_BINS, PATCH_DIM = 128, 3 * 2 * 14 * 14


def expand_placeholders(tokenizer, texts, audio_frames, image_grids, video_grids, seconds_per_grid,
                        use_audio_in_video):
    """The reference processor's `replace_multimodal_special_tokens`, run on our tokenizer."""
    holder = SimpleNamespace(audio_token="<|AUDIO|>", image_token="<|IMAGE|>", video_token="<|VIDEO|>",
                             vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
                             audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>",
                             image_processor=SimpleNamespace(merge_size=2), video_processor=SimpleNamespace(merge_size=2))
    holder.get_chunked_index = lambda idx, n: Qwen2_5OmniProcessor.get_chunked_index(holder, idx, n)
    frames = np.asarray(audio_frames, np.int64)
    audio_lengths = iter(((frames - 1) // 2 + 1 - 2) // 2 + 1)
    return Qwen2_5OmniProcessor.replace_multimodal_special_tokens(
        holder, texts, audio_lengths, iter(np.asarray(image_grids).reshape(-1, 3)),
        iter(np.asarray(video_grids).reshape(-1, 3)), iter(seconds_per_grid), use_audio_in_video, 25, 2.0)


def build(checkpoint, texts, audio_frames=(), image_grids=(), video_grids=(), seconds_per_grid=(),
          use_audio_in_video=False, seed=0):
    """Returns the processor-shaped inputs dict (numpy)."""
    rng = np.random.default_rng(seed)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    texts = expand_placeholders(tokenizer, texts, audio_frames, image_grids, video_grids, list(seconds_per_grid),
                                use_audio_in_video)
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, padding=True, return_tensors="np")
    inputs = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    if len(audio_frames):
        longest = max(audio_frames) + 7  # padded like the feature extractor's max_length padding
        inputs["input_features"] = rng.standard_normal((len(audio_frames), MEL_BINS, longest)).astype(np.float32)
        inputs["feature_attention_mask"] = (np.arange(longest)[None, :] < np.asarray(audio_frames)[:, None]).astype(np.int64)
    if len(image_grids):
        grids = np.asarray(image_grids, np.int64).reshape(-1, 3)
        inputs["pixel_values"] = rng.standard_normal((int(grids.prod(1).sum()), PATCH_DIM)).astype(np.float32)
        inputs["image_grid_thw"] = grids
    if len(video_grids):
        grids = np.asarray(video_grids, np.int64).reshape(-1, 3)
        inputs["pixel_values_videos"] = rng.standard_normal((int(grids.prod(1).sum()), PATCH_DIM)).astype(np.float32)
        inputs["video_grid_thw"] = grids
        inputs["video_second_per_grid"] = np.asarray(seconds_per_grid, np.float32)
    return inputs


AUDIO = "<|audio_bos|><|AUDIO|><|audio_eos|>"
IMAGE = "<|vision_bos|><|IMAGE|><|vision_eos|>"
VIDEO = "<|vision_bos|><|VIDEO|><|vision_eos|>"

# Every modality mix the acceptance names: (texts, audio frames, image grids, video grids, seconds per grid, audio in video)
CASES = {
    "text": (["hello there, how are you?"], (), (), (), (), False),
    "audio": (["Transcribe: " + AUDIO + " please"], (57,), (), (), (), False),
    "image": ([IMAGE + "What is in this picture?"], (), ((1, 6, 10),), (), (), False),
    "video": (["Describe " + VIDEO + " now"], (), (), ((4, 4, 6),), (1.0,), False),
    "audio_image_video": (["a " + AUDIO + " b " + IMAGE + " c " + VIDEO + " d " + AUDIO + " e"], (57, 23),
                          ((1, 6, 10),), ((2, 4, 6),), (0.5,), False),
    "audio_in_video": (["Look and listen: " + VIDEO + " and " + IMAGE], (230,), ((1, 4, 4),), ((6, 4, 4),), (1.0,), True),
    "mixed_batch_padded": (["short " + IMAGE, "a longer prompt with " + AUDIO + " and " + VIDEO + " inside it"], (45,),
                           ((1, 4, 6),), ((2, 4, 4),), (2.0,), False),
}


def case(checkpoint, name, seed=0):
    texts, frames, images, videos, seconds, in_video = CASES[name]
    return build(checkpoint, texts, frames, images, videos, seconds, in_video, seed), in_video
