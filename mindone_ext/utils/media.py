"""Loading audio, images and video from what users put in a conversation: local paths, file://
and http(s):// URLs, base64 data URLs, raw bytes, numpy arrays and PIL images.

Images come back as RGB PIL images. Decoding uses PyAV (FFmpeg), so any container FFmpeg reads
works; audio loading is in `audio.py`, video frames in `video.py`. Every failure is a
MediaError naming the source and the problem.
"""
import base64
import io
import os
import urllib.parse
import urllib.request

import numpy as np

# An image's declared size is checked before it is decoded: a few KB can declare 20000 x 20000.
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


def open_container(data, source, what):
    """FFmpeg's view of `data` (a path or file object from `open_source(source)`)."""
    import av

    try:
        return av.open(data)
    except Exception as e:  # FFmpeg's errors come as many types; all mean the same to a user
        raise MediaError(f"{what} {describe(source)}: cannot be decoded ({type(e).__name__}: {e})") from None


def load_image(source, max_pixels=MAX_IMAGE_PIXELS):
    """An RGB PIL image, as qwen-omni-utils makes it: transparency (RGBA) composited on white,
    any other mode converted. One of more than `max_pixels` pixels is refused (a file by its
    header, before it is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, "image")
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[-1] not in (1, 3, 4)):
            raise MediaError(f"image array of shape {source.shape}: expected (height, width[, 1, 3 or 4])")
        _check_pixels(source.shape[1::-1], max_pixels, "image array")
        return to_rgb(Image.fromarray(np.squeeze(source.astype(np.uint8), -1) if source.ndim == 3 and
                                      source.shape[-1] == 1 else source.astype(np.uint8)))
    try:
        with Image.open(open_source(source, "image")) as image:
            _check_pixels(image.size, max_pixels, f"image {describe(source)}")
            return to_rgb(image)
    except Image.DecompressionBombError as e:  # PIL's own header check, for the largest
        raise MediaError(f"image {describe(source)}: more than the {max_pixels} pixels allowed ({e})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"image {describe(source)}: cannot be decoded ({e})") from None


def to_rgb(image):
    """RGB with transparency composited on white (the reference does this for RGBA only; other
    modes, LA and palette transparency included, are converted as PIL converts them)."""
    from PIL import Image

    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def _check_pixels(size, max_pixels, what):
    width, height = size
    if width * height > max_pixels:
        raise MediaError(f"{what}: {width} x {height} is more than the {max_pixels} pixels allowed")
