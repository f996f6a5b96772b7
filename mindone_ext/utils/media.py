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
# Declared properties are checked before anything is decoded: a few KB can declare hours of 1 Hz
# audio or a 20000 x 20000 image, gigabytes once decoded.
AUDIO_RATES = (4000, 384000)  # sample rates real audio comes at
MAX_IMAGE_PIXELS = 8192 * 8192  # the processor resizes to at most ~12.8 million pixels anyway


class MediaError(ValueError):
    pass


class MediaTooLong(MediaError):
    """Audio past the caller's limit (`max_seconds`)."""


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


def _to_16k_mono(frames, max_seconds=None, what="audio"):
    """Audio frames through FFmpeg's resampler (mono float, 16 kHz), flushed at the end; decoding
    stops with a MediaError as soon as more than `max_seconds` have come."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    out, seconds = [], 0.0
    for frame in itertools.chain(frames, [None]):  # None flushes the resampler
        if frame is not None:
            _check_rate(frame.sample_rate, what)
            seconds += frame.samples / frame.sample_rate
            if max_seconds is not None and seconds > max_seconds:
                raise MediaTooLong(f"{what}: longer than {max_seconds:g} s")
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def _check_rate(rate, what):
    if not AUDIO_RATES[0] <= rate <= AUDIO_RATES[1]:
        raise MediaError(f"{what}: a sample rate of {rate} Hz is not supported "
                         f"({AUDIO_RATES[0]} to {AUDIO_RATES[1]} Hz)")


def resample(samples, rate, what="audio"):
    """Mono float32 `samples` at `rate` -> 16 kHz; (channels, samples) or (samples, channels)
    input is downmixed first."""
    import av

    _check_rate(rate, what)
    samples = np.asarray(samples, np.float32)
    if samples.ndim == 2:
        samples = samples.mean(0 if samples.shape[0] < samples.shape[1] else 1)
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(samples)
    frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
    frame.sample_rate = int(rate)
    return _to_16k_mono([frame])


def load_audio(source, sample_rate=None, what="audio", max_seconds=None):
    """float32 mono samples at 16 kHz. `source` may be an array (at `sample_rate`, 16 kHz if
    not given), a (array, rate) pair, or anything `open_source` takes. With `max_seconds`, longer
    audio is refused, by its declared duration before decoding or as soon as decoding passes it."""
    if isinstance(source, tuple) and len(source) == 2 and np.isscalar(source[1]):
        source, sample_rate = source
    where = f"{what} {describe(source)}"
    if isinstance(source, np.ndarray):
        rate = sample_rate or SAMPLE_RATE
        if max_seconds is not None and max(source.shape or (1,)) > max_seconds * rate:  # samples, whatever the layout
            raise MediaTooLong(f"{where}: longer than {max_seconds:g} s")
        audio = resample(source, rate, where)
    else:
        with _open_container(source, what) as container:
            if not container.streams.audio:
                raise MediaError(f"{where}: has no audio track")
            stream = container.streams.audio[0]
            _check_rate(stream.sample_rate or SAMPLE_RATE, where)
            declared = stream.duration * stream.time_base if stream.duration and stream.time_base else None
            if max_seconds is not None and declared is not None and declared > max_seconds:
                raise MediaTooLong(f"{where}: longer than {max_seconds:g} s ({float(declared):.1f} s declared)")
            try:
                audio = _to_16k_mono(container.decode(audio=0), max_seconds, where)
            except MediaError:
                raise
            except Exception as e:
                raise MediaError(f"{where}: corrupt audio ({type(e).__name__}: {e})") from None
    if audio.size == 0:
        raise MediaError(f"{what} {describe(source)}: contains no audio samples")
    if not np.isfinite(audio).all():
        raise MediaError(f"{what} {describe(source)}: contains NaN or infinite samples")
    return audio


def load_image(source, max_pixels=MAX_IMAGE_PIXELS):
    """An RGB PIL image; one of more than `max_pixels` pixels is refused (a file by its header,
    before it is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, "image")
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[-1] not in (3, 4):
            raise MediaError(f"image array of shape {source.shape}: expected (height, width, 3)")
        _check_pixels(source.shape[1::-1], max_pixels, "image array")
        return Image.fromarray(source.astype(np.uint8)).convert("RGB")
    try:
        with Image.open(open_source(source, "image")) as image:
            _check_pixels(image.size, max_pixels, f"image {describe(source)}")
            return image.convert("RGB")
    except Image.DecompressionBombError as e:  # PIL's own header check, for the largest
        raise MediaError(f"image {describe(source)}: more than the {max_pixels} pixels allowed ({e})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"image {describe(source)}: cannot be decoded ({e})") from None


def _check_pixels(size, max_pixels, what):
    width, height = size
    if width * height > max_pixels:
        raise MediaError(f"{what}: {width} x {height} is more than the {max_pixels} pixels allowed")


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
