"""The media of `processor.apply_chat_template(..., tokenize=True)`, gathered and loaded as
transformers' processors do it (the route its model card documents): sources under an item's
`audio`/`image`/`video`, `url`, `path` (or `base64`, images) key; audio decoded, mixed to mono and resampled to 16 kHz by
FFmpeg (as transformers does with torchcodec, which its video loading needs anyway: FFmpeg's
downmix, not a mean, so a stereo clip of two equal channels comes out 1.41 times louder than in
the qwen-omni-utils route); images converted to RGB after their EXIF rotation; videos decoded whole, or `fps` / `num_frames`
frames sampled by its video processor's rule. Sizing is then the processor's own.

(The qwen-omni-utils route, `process_mm_info` then the processor, samples and sizes media its own
way; each route gives what it gives in the reference.)"""
import base64
import binascii
import math
import os

import numpy as np

from ...utils.audio import SAMPLE_RATE, check_rate
from ...utils.media import MAX_IMAGE_PIXELS, MediaError, _check_pixels, describe, open_container, open_source
from ...utils.video import read_frames

MAX_AUDIO_SECONDS = 3600  # decoding stops there: a small file can declare days of audio

SOURCE_KEYS = {"audio": ("audio", "url", "path"), "image": ("image", "url", "path", "base64"),
               "video": ("video", "url", "path")}


def sources(message, kind):
    return [item[key] for item in message.get("content", []) if isinstance(item, dict) and item.get("type") == kind
            for key in SOURCE_KEYS[kind] if key in item]


def gather(conversations, load_audio_from_video=False):
    """(images per conversation, videos per conversation, audio clips of all of them in order):
    with `load_audio_from_video` the clips are the videos' soundtracks and audio items are not read,
    as in the reference."""
    images, videos, audios = [], [], []
    for conversation in conversations:
        images.append([]), videos.append([])
        for message in conversation:
            images[-1] += [load_image(s) for s in sources(message, "image")]
            found = sources(message, "video")
            videos[-1] += found
            audios += [load_audio(s, "video" if load_audio_from_video else "audio")
                       for s in (found if load_audio_from_video else sources(message, "audio"))]
    return images, videos, audios


def load_audio(source, what="audio"):
    """float32 mono at 16 kHz through FFmpeg's resampler (transformers' load_audio_torchcodec)."""
    import av

    where = f"{what} {describe(source)}"
    pieces, total = [], 0
    with open_container(open_source(source, what), source, what) as container:
        if not container.streams.audio:
            raise MediaError(f"{where}: has no audio track")
        check_rate(container.streams.audio[0].sample_rate or SAMPLE_RATE, where)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        try:
            for frame in container.decode(audio=0):
                for converted in resampler.resample(frame):
                    pieces.append(converted.to_ndarray().reshape(-1))
                    total += len(pieces[-1])
                if total > MAX_AUDIO_SECONDS * SAMPLE_RATE:
                    raise MediaError(f"{where}: longer than {MAX_AUDIO_SECONDS} s")
            pieces += [converted.to_ndarray().reshape(-1) for converted in resampler.resample(None)]
        except MediaError:
            raise
        except Exception as e:  # FFmpeg's errors come as many types; all mean the same to a user
            raise MediaError(f"{where}: corrupt audio ({type(e).__name__}: {e})") from None
    if not total:
        raise MediaError(f"{where}: contains no audio samples")
    return np.concatenate(pieces).astype(np.float32)


def load_image(source):
    """transformers' load_image: path, URL or base64 (with or without a data: header); EXIF
    orientation applied; converted to RGB (transparency dropped, not composited)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source).convert("RGB")
    if isinstance(source, str) and ":" not in source[:10] and not os.path.isfile(source):
        try:  # a bare base64 string, which the reference also takes
            base64.b64decode(source, validate=True)
            source = "data:image;base64," + source
        except (binascii.Error, ValueError):
            pass  # a path after all: open_source says it is missing
    try:
        with Image.open(open_source(source, "image")) as image:
            _check_pixels(image.size, MAX_IMAGE_PIXELS, f"image {describe(source)}")
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"image {describe(source)}: cannot be decoded ({e})") from None


def sample_indices(total, video_fps, fps=None, num_frames=None, temporal_patch_size=2, min_frames=4, max_frames=768):
    """Qwen2-VL's video processor: every frame, or `num_frames` (rounded to whole temporal
    patches) or `fps` frames a second, spread as torch.arange(0, total, total / n).int()."""
    if fps is not None and num_frames is not None:
        raise ValueError("fps and num_frames are mutually exclusive; give one")
    if num_frames is not None:
        n = round(num_frames / temporal_patch_size) * temporal_patch_size
    elif fps is not None:
        cap = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
        n = min(min(max(total / video_fps * fps, min_frames), cap), total)
        n = math.floor(n / temporal_patch_size) * temporal_patch_size
    else:
        return np.arange(total)
    if n > total:
        raise ValueError(f"a video of {total} frames cannot give {n} sampled frames; lower fps or num_frames")
    if n <= 0:
        raise ValueError(f"a video of {total} frames gives no frames at fps={fps}, num_frames={num_frames}")
    step = total / n
    # torch.arange: length ceil(total / step) in double, values start + i * step rounded to float32
    return (np.arange(math.ceil(total / step)) * step).astype(np.float32).astype(np.int64)


def load_videos(videos, fps=None, num_frames=None):
    """Each video source -> uint8 frames (T, H, W, 3), sampled as `sample_indices` says."""
    return [read_frames(source, lambda total, rate, h, w: (sample_indices(total, rate, fps, num_frames), lambda f: f))
            for source in videos]
