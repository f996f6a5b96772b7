"""Loading audio, images and video from what users put in a conversation: local paths, file://
and http(s):// URLs, base64 data URLs, raw bytes, numpy arrays and PIL images.

Audio comes back as float32 mono at 16 kHz; images as RGB PIL images; video as uint8 frames
(T, H, W, 3) sampled at a target fps. Decoding uses PyAV (FFmpeg), so any container FFmpeg reads
works, and a video's own audio track can be extracted. Every failure is a MediaError naming the
source and the problem.
"""
import base64
import io
import itertools
import os
import urllib.parse
import urllib.request

import numpy as np

SAMPLE_RATE = 16000


class MediaError(ValueError):
    pass


def describe(source):
    if isinstance(source, str):
        return source if len(source) < 120 else source[:60] + "..." + source[-20:]
    return f"<{type(source).__name__}>"


def open_source(source, what):
    """A path or a file-like object for `source`; raises MediaError for what cannot be opened."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    if not isinstance(source, str):
        raise MediaError(f"{what} {describe(source)}: unsupported source type {type(source).__name__}")
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise MediaError(f"{what} {describe(source)}: only base64 data URLs are supported")
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True))
        except ValueError as e:
            raise MediaError(f"{what} {describe(source)}: invalid base64 data ({e})") from None
    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                return io.BytesIO(response.read())
        except OSError as e:
            raise MediaError(f"{what} {describe(source)}: download failed ({e})") from None
    if scheme == "file":
        source = urllib.parse.unquote(urllib.parse.urlparse(source).path)
    elif scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise MediaError(f"{what} {describe(source)}: unsupported URL scheme {scheme!r} "
                         "(use a path, file://, http(s):// or a base64 data URL)")
    if not os.path.isfile(source):
        raise MediaError(f"{what} {describe(source)}: file not found")
    if os.path.getsize(source) == 0:
        raise MediaError(f"{what} {describe(source)}: file is empty")
    return source


def _open_container(source, what):
    import av

    try:
        return av.open(open_source(source, what))
    except MediaError:
        raise
    except Exception as e:  # FFmpeg's errors come as many types; all mean the same to a user
        raise MediaError(f"{what} {describe(source)}: cannot be decoded ({type(e).__name__}: {e})") from None


def _to_16k_mono(frames):
    """Audio frames through FFmpeg's resampler (mono float, 16 kHz), flushed at the end."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    out = []
    for frame in itertools.chain(frames, [None]):  # None flushes the resampler
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def resample(samples, rate):
    """Mono float32 `samples` at `rate` -> 16 kHz; (channels, samples) or (samples, channels)
    input is downmixed first."""
    import av

    samples = np.asarray(samples, np.float32)
    if samples.ndim == 2:
        samples = samples.mean(0 if samples.shape[0] < samples.shape[1] else 1)
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(samples)
    frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
    frame.sample_rate = int(rate)
    return _to_16k_mono([frame])


def load_audio(source, sample_rate=None, what="audio"):
    """float32 mono samples at 16 kHz. `source` may be an array (at `sample_rate`, 16 kHz if
    not given), a (array, rate) pair, or anything `open_source` takes."""
    if isinstance(source, tuple) and len(source) == 2 and np.isscalar(source[1]):
        source, sample_rate = source
    if isinstance(source, np.ndarray):
        audio = resample(source, sample_rate or SAMPLE_RATE)
    else:
        with _open_container(source, what) as container:
            if not container.streams.audio:
                raise MediaError(f"{what} {describe(source)}: has no audio track")
            try:
                audio = _to_16k_mono(container.decode(audio=0))
            except Exception as e:
                raise MediaError(f"{what} {describe(source)}: corrupt audio ({type(e).__name__}: {e})") from None
    if audio.size == 0:
        raise MediaError(f"{what} {describe(source)}: contains no audio samples")
    if not np.isfinite(audio).all():
        raise MediaError(f"{what} {describe(source)}: contains NaN or infinite samples")
    return audio


def load_image(source):
    """An RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[-1] not in (3, 4):
            raise MediaError(f"image array of shape {source.shape}: expected (height, width, 3)")
        return Image.fromarray(source.astype(np.uint8)).convert("RGB")
    try:
        with Image.open(open_source(source, "image")) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"image {describe(source)}: cannot be decoded ({e})") from None


def resize_frames(frames, height, width):
    """uint8-range frames (T, H, W, 3) -> (T, height, width, 3), bicubic as PIL does it."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(np.clip(f, 0, 255).astype(np.uint8)).resize((width, height),
                                                                                             Image.BICUBIC))
                     for f in frames])


def load_video_frames(source):
    """All frames of a video as uint8 (T, H, W, 3) and its frame rate."""
    with _open_container(source, "video") as container:
        if not container.streams.video:
            raise MediaError(f"video {describe(source)}: has no video track")
        stream = container.streams.video[0]
        try:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        except Exception as e:
            raise MediaError(f"video {describe(source)}: corrupt video ({type(e).__name__}: {e})") from None
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
    if not frames:
        raise MediaError(f"video {describe(source)}: contains no frames")
    return np.stack(frames), rate
