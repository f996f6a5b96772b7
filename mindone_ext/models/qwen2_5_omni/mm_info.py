"""`process_mm_info`: the media of a conversation, loaded and sized the way Qwen's own helper
(qwen-omni-utils) does, ready for the processor.

Images are resized to multiples of 28 within a pixel budget (resized, never refused). Videos are
sampled at `fps` (2 by default, between 4 and 768 frames, an even count) and resized within a
per-frame budget derived from a total budget. Audio is 16 kHz mono; with `use_audio_in_video` a
video's own audio track is extracted (a video without one is an error).
"""
import math

import numpy as np
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from ...utils.media import MediaError, describe, load_audio, load_image, load_video_frames, resize_frames

FACTOR = 28
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
FRAME_FACTOR, FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2, 2.0, 4, 768


def resize_image(image, min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS):
    from PIL import Image

    height, width = smart_resize(image.height, image.width, FACTOR, min_pixels, max_pixels)
    return image.resize((width, height), Image.BICUBIC)


def frame_count(total, video_fps, fps=FPS, min_frames=FPS_MIN_FRAMES, max_frames=FPS_MAX_FRAMES):
    """How many frames to sample: `fps` per second, clamped, even, at most what there is."""
    low = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    high = math.floor(min(max_frames, total) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(min(max(total / video_fps * fps, low), high), total)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total:
        raise MediaError(f"video has {total} frames: at least {FRAME_FACTOR} are needed")
    return n


def sample_video(frames, video_fps, fps=FPS, min_frames=FPS_MIN_FRAMES, max_frames=FPS_MAX_FRAMES,
                 min_pixels=VIDEO_MIN_PIXELS, max_pixels=None, total_pixels=VIDEO_TOTAL_PIXELS):
    """uint8 frames (T, H, W, 3) at `video_fps` -> (sampled, resized frames, their fps)."""
    total = len(frames)
    n = frame_count(total, video_fps, fps, min_frames, max_frames)
    index = np.round(np.linspace(0, total - 1, n)).astype(np.int64)
    budget = max(min(VIDEO_MAX_PIXELS, total_pixels / n * FRAME_FACTOR), int(min_pixels * 1.05))
    budget = min(max_pixels, budget) if max_pixels else budget
    height, width = smart_resize(frames.shape[1], frames.shape[2], FACTOR, min_pixels, budget)
    return resize_frames(frames[index], height, width), n / max(total, 1e-6) * video_fps


def _media_items(conversations):
    """Every content item that may hold media (text items, given as strings, hold none)."""
    if not isinstance(conversations, (list, tuple)):
        raise ValueError(f"a conversation is a list of messages, got {type(conversations).__name__}")
    batch = conversations and isinstance(conversations[0], (list, tuple))
    for c, conversation in enumerate(conversations if batch else [conversations]):
        for m, message in enumerate(conversation):
            where = f"conversation {c}, message {m}" if batch else f"message {m}"
            if not isinstance(message, dict):
                raise ValueError(f"{where}: a message is a dict with a role and content, got {type(message).__name__}")
            if isinstance(message.get("content"), list):
                for i, item in enumerate(message["content"]):
                    if isinstance(item, dict):
                        yield item
                    elif not isinstance(item, str):
                        raise ValueError(f"{where}, content item {i}: expected a dict (or a string of text), got "
                                         f"{type(item).__name__}")


def process_mm_info(conversations, use_audio_in_video=False, return_video_kwargs=False):
    """(audios, images, videos) of one conversation or a list of them, each None when empty.
    With `return_video_kwargs=True`, also {"fps": [...]} to pass to the processor."""
    audios, images, videos, fps = [], [], [], []
    for item in _media_items(conversations):
        kind = item.get("type")
        if kind == "audio" or "audio" in item or "audio_url" in item:
            audios.append(load_audio(item.get("audio", item.get("audio_url"))))
        elif kind in ("image", "image_url") or "image" in item or "image_url" in item:
            source = item.get("image", item.get("image_url"))
            source = source.get("url") if isinstance(source, dict) else source
            image = load_image(source)
            if "resized_height" in item and "resized_width" in item:
                height, width = smart_resize(item["resized_height"], item["resized_width"], FACTOR)
                images.append(image.resize((width, height)))
            else:
                images.append(resize_image(image, item.get("min_pixels", IMAGE_MIN_PIXELS),
                                           item.get("max_pixels", IMAGE_MAX_PIXELS)))
        elif kind == "video" or "video" in item:
            source = item["video"]
            if isinstance(source, (list, tuple)):  # already a list of frames
                frames = np.stack([np.asarray(load_image(f)) for f in source])
                if len(frames) % FRAME_FACTOR:  # an even count, padded with the last frame
                    frames = np.concatenate([frames, frames[-1:]])
                rate = item.get("sample_fps", FPS)
                frames, rate = sample_video(frames, rate, rate, len(frames), len(frames))
            else:
                frames, video_fps = (source, item.get("video_fps", FPS)) if isinstance(source, np.ndarray) \
                    else load_video_frames(source)
                if video_fps is None:
                    raise MediaError(f"video {describe(source)}: unknown frame rate")
                if not (isinstance(video_fps, (int, float)) and video_fps > 0):
                    raise MediaError(f"video {describe(source)}: video_fps must be a positive number, got {video_fps!r}")
                frames, rate = sample_video(frames, video_fps, item.get("fps", FPS),
                                            item.get("min_frames", FPS_MIN_FRAMES), item.get("max_frames", FPS_MAX_FRAMES),
                                            item.get("min_pixels", VIDEO_MIN_PIXELS), item.get("max_pixels"),
                                            item.get("total_pixels", VIDEO_TOTAL_PIXELS))
            videos.append(frames)
            fps.append(rate)
            if use_audio_in_video:
                if isinstance(source, (list, tuple, np.ndarray)):
                    raise MediaError("use_audio_in_video=True needs a video file with an audio track, "
                                     "not frames")
                try:
                    audios.append(load_audio(source, what="video"))
                except MediaError as e:
                    raise MediaError(f"{e}; use_audio_in_video=True needs the video's audio track") from None
    result = (audios or None, images or None, videos or None)
    return result + ({"fps": fps},) if return_video_kwargs else result
