"""`process_mm_info`: the media of a conversation, loaded and sized exactly as Qwen's own helper
(qwen-omni-utils 0.0.9, with decord reading videos) does, ready for the processor.

- Audio: 16 kHz mono float32 (see utils/audio.py); `audio_start` / `audio_end` cut it. With
  `use_audio_in_video`, a video's own soundtrack, cut by `video_start` / `video_end`.
- Images: RGB PIL images (transparency on white), resized (PIL bicubic) to multiples of 28
  within `min_pixels` .. `max_pixels` (4 to 16384 tokens), or to `resized_height` x
  `resized_width` rounded to multiples of 28.
- Videos: float32 frames (T, 3, H, W) holding 0-255 values, as the reference returns them. From
  a file: `fps` frames a second (2; between `min_frames` 4 and `max_frames` 768, an even count)
  or `nframes`, spread evenly over `video_start` .. `video_end`; only those frames are decoded
  and kept. From a list of images: each image sized as an image with the item's options (to
  multiples of 56, as the reference does), the list padded to an even length with the last; its
  rate is `sample_fps` (2). Then every frame is resized (torchvision's antialiased bicubic,
  rounded to 0-255) within a per-frame budget: `min_pixels` (128 tokens) .. min(`max_pixels`,
  768 tokens, `total_pixels` / T * 2).
"""
import numpy as np

from ...utils.audio import load_audio
from ...utils.media import MediaError, load_image
from ...utils.resize import resize_rounded
from ...utils.small_pages import on_small_pages
from ...utils.video import read_frames
from .sizing import smart_resize

FACTOR = 28
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 128000 * 28 * 28 * 0.9  # the reference's MODEL_SEQ_LEN of 128000 tokens, 90% for video
FRAME_FACTOR, FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2, 2.0, 4, 768


def fetch_image(source, item, factor=FACTOR):
    """An RGB PIL image sized by the item's options to multiples of `factor`, within 4 to 16384
    factor x factor tiles by default."""
    from PIL import Image

    image = load_image(source)
    low, high = 4 * factor * factor, 16384 * factor * factor
    if "resized_height" in item and "resized_width" in item:
        height, width = smart_resize(item["resized_height"], item["resized_width"], factor, low, high, utils=True)
    else:
        height, width = smart_resize(image.height, image.width, factor, item.get("min_pixels", low),
                                     item.get("max_pixels", high), utils=True)
    return image.resize((width, height), Image.BICUBIC)


def frame_range(item, total, fps):
    """(first, last) frame of `video_start` .. `video_end` (seconds), as the reference rounds them."""
    start, end = item.get("video_start"), item.get("video_end")
    if start is None and end is None:
        return 0, total - 1
    duration = total / fps
    first = int(np.ceil(max(0.0, min(start, duration)) * fps)) if start is not None else 0
    last = min(int(np.floor(max(0.0, min(end, duration)) * fps)), total - 1) if end is not None else total - 1
    if first >= last:
        raise MediaError(f"video_start={start} .. video_end={end} holds no frames of a {duration:.2f} s video "
                         f"({total} frames at {fps:g} fps)")
    return first, last


def frame_count(item, total, fps):
    """How many frames to sample: `nframes`, or `fps` a second clamped to `min_frames` ..
    `max_frames`; even, and at most what there is."""
    if "nframes" in item:
        if "fps" in item:
            raise ValueError("a video item takes either nframes or fps, not both")
        n = round(item["nframes"] / FRAME_FACTOR) * FRAME_FACTOR
    else:
        low = int(np.ceil(item.get("min_frames", FPS_MIN_FRAMES) / FRAME_FACTOR)) * FRAME_FACTOR
        high = int(np.floor(item.get("max_frames", min(FPS_MAX_FRAMES, total)) / FRAME_FACTOR)) * FRAME_FACTOR
        n = min(min(max(total / fps * item.get("fps", FPS), low), high), total)
        n = int(np.floor(n / FRAME_FACTOR)) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total:
        raise MediaError(f"a video of {total} frames gives {n} sampled frames: between {FRAME_FACTOR} and "
                         f"{total} are needed")
    return n


def spread(first, last, n):
    """`torch.linspace(first, last, n).round()`, float32 rounding included: the first half counted
    up from `first`, the rest down from `last` (each step fused, as torch's kernel computes it),
    then rounded half to even."""
    if n == 1:
        return np.array([first])
    step = np.float64(np.float32(np.float32(last - first) / np.float32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    values = np.where(i < n // 2, np.float64(np.float32(first)) + step * i,
                      np.float64(np.float32(last)) - step * (n - 1 - i)).astype(np.float32)
    return np.round(values).astype(np.int64)


def frame_size(item, n, height, width):
    """The size every frame of an n-frame video is resized to."""
    if "resized_height" in item and "resized_width" in item:
        return smart_resize(item["resized_height"], item["resized_width"], FACTOR, IMAGE_MIN_PIXELS,
                            IMAGE_MAX_PIXELS, utils=True)
    min_pixels = item.get("min_pixels", VIDEO_MIN_PIXELS)
    budget = max(min(VIDEO_MAX_PIXELS, item.get("total_pixels", VIDEO_TOTAL_PIXELS) / n * FRAME_FACTOR),
                 int(min_pixels * 1.05))
    return smart_resize(height, width, FACTOR, min_pixels, min(item.get("max_pixels", budget), budget), utils=True)


@on_small_pages
def fetch_video(source, item):
    """(float32 frames (T, 3, H, W), their rate)."""
    if isinstance(source, (list, tuple)):  # images, each sized as an image with the item's options
        if not source:
            raise MediaError("a video given as a list of frames needs at least one frame")
        # the reference sizes each frame as an image with the video's options, to multiples of
        # 56 (it passes its factor, 28, where fetch_image expects the patch size, 14)
        images = [np.asarray(fetch_image(frame, item, 2 * FACTOR)) for frame in source]
        if len({i.shape for i in images}) > 1:
            raise MediaError(f"a video's frames must all have one size, got {sorted({i.shape[:2] for i in images})}")
        images += images[-1:] * (len(images) % FRAME_FACTOR)
        height, width = frame_size(item, len(images), *images[0].shape[:2])
        frames, rate = resize_rounded(np.stack(images), height, width), item.get("sample_fps", FPS)
    else:
        sampled = {}

        def plan(total, fps, height, width):
            first, last = frame_range(item, total, fps)
            n = frame_count(item, last - first + 1, fps)
            sampled["rate"] = n / (last - first + 1) * fps
            size = frame_size(item, n, height, width)
            return spread(first, last, n), lambda frame: resize_rounded(frame, *size)

        if isinstance(source, np.ndarray):  # decoded frames (T, H, W, 3) at `video_fps`
            fps = item.get("video_fps", FPS)
            if source.ndim != 4 or source.shape[-1] != 3:
                raise MediaError(f"video frames must be (T, H, W, 3), got shape {source.shape}")
            if not (isinstance(fps, (int, float)) and fps > 0):
                raise MediaError(f"video_fps must be a positive number, got {fps!r}")
            indices, transform = plan(len(source), fps, *source.shape[1:3])
            frames = np.stack([transform(frame) for frame in np.clip(source[indices], 0, 255).astype(np.uint8)])
        else:
            frames = read_frames(source, plan)
        rate = sampled["rate"]
    return channels_first(frames), rate


def channels_first(frames):
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32, the reference's layout, frame by frame: the
    whole video's transposing cast ran ~30x slower (4.5 s against 0.16 s for 120 frames of
    560 x 1008: its reads fall out of the cache)."""
    out = np.empty((len(frames), frames.shape[3]) + frames.shape[1:3], np.float32)
    for t, frame in enumerate(frames):
        out[t] = frame.transpose(2, 0, 1)
    return out


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
    With `return_video_kwargs=True`, also the processor's video arguments ({"fps": [...]})."""
    audios, images, videos, fps = [], [], [], []
    for item in _media_items(conversations):
        kind = item.get("type")
        if kind == "audio" or "audio" in item or "audio_url" in item:
            audios.append(load_audio(item.get("audio", item.get("audio_url")), start=item.get("audio_start", 0.0),
                                     end=item.get("audio_end")))
        elif kind in ("image", "image_url") or "image" in item or "image_url" in item:
            source = item.get("image", item.get("image_url"))
            images.append(fetch_image(source.get("url") if isinstance(source, dict) else source, item))
        elif kind == "video" or "video" in item:
            source = item.get("video")
            frames, rate = fetch_video(source, item)
            videos.append(frames)
            fps.append(rate)
            if use_audio_in_video:
                if not isinstance(source, str):
                    raise MediaError("use_audio_in_video=True needs a video file with an audio track, not frames")
                try:
                    audios.append(load_audio(source, what="video", start=item.get("video_start", 0.0),
                                             end=item.get("video_end"), soundtrack=True))
                except MediaError as e:
                    raise MediaError(f"{e}; use_audio_in_video=True needs the video's audio track") from None
    result = (audios or None, images or None, videos or None)
    return result + ({"do_sample_frames": False, "fps": fps},) if return_video_kwargs else result

