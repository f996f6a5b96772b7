"""Antialiased bicubic resizing, computed as torchvision resizes the reference's images and videos
(`torchvision.transforms.functional.resize(x, size, BICUBIC, antialias=True)`: Keys cubic with
a = -0.5, widened by the scale when shrinking, a horizontal pass then a vertical one).

uint8 input takes torch's integer kernel (weights rounded to int16 at the highest precision that
fits, each pass rounded and clamped to uint8), as `torchvision.transforms.v2.functional.resize`
runs it for transformers' image processors: bit-exact (tests/utils/test_resize.py; the v1 function
resizes uint8 in float and rounds: `resize_rounded`). Float input takes its float32 kernel:
bit-exact when enlarging; when shrinking within ~6e-5 on a 0-255 scale (the weights are exact,
torch sums them in an order not reproduced here). PIL's bicubic,
which the reference uses only for images it resizes itself, differs from torch's by up to ~20
levels on sharp edges.
"""
import numpy as np


def resize(frames, height, width):
    """(H, W, C) or (T, H, W, C), uint8 or float, -> the same at height x width, the dtype kept
    (frame by frame: memory holds one frame's intermediate, however long the video)."""
    frames = np.asarray(frames)
    if frames.ndim == 4:
        return np.stack([resize(frame, height, width) for frame in frames]) if len(frames) else \
            np.zeros((0, height, width, frames.shape[-1]), frames.dtype)
    resample = _resample_uint8 if frames.dtype == np.uint8 else _resample_float
    if frames.dtype != np.uint8:
        frames = frames.astype(np.float32, copy=False)
    # Each pass resamples the first axis of a contiguous array, where a tap's gather copies whole
    # rows: gathering along the width (a middle axis) took ~3x as long (45 against 17 ms, 720p)
    if frames.shape[1] != width:
        frames = resample(np.ascontiguousarray(frames.transpose(1, 0, 2)), width).transpose(1, 0, 2)
    if frames.shape[0] != height:
        frames = resample(np.ascontiguousarray(frames), height)
    return np.ascontiguousarray(frames)


def resize_rounded(frames, height, width):
    """uint8 frames resized as `torchvision.transforms.functional.resize` resizes uint8 tensors
    (qwen-omni-utils' videos): the float kernel, clamped to 0-255 and rounded back to uint8.
    Frames already at the size are returned as they are."""
    frames = np.asarray(frames)
    if frames.shape[-3:-1] == (height, width):
        return frames
    resized = resize(frames.astype(np.float32), height, width)
    return np.round(np.clip(resized, 0, 255, out=resized), out=resized).astype(np.uint8)


def _cubic(x, a=-0.5):
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _int16_weights(in_size, out_size):
    """Per output position: first input index, tap count, int16 weights (out, taps), precision."""
    scale = in_size / out_size
    support, invscale = (2.0 * scale, 1.0 / scale) if scale >= 1.0 else (2.0, 1.0)
    center = scale * (np.arange(out_size) + 0.5)
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    taps = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    weights, total = np.zeros((out_size, int(taps.max()))), np.zeros(out_size)
    for j in range(weights.shape[1]):  # summed tap by tap, in the kernel's order
        weights[:, j] = np.where(j < taps, _cubic(((first + j) - center + 0.5) * invscale), 0.0)
        total += weights[:, j]
    weights = np.where(total[:, None] != 0, weights / np.where(total == 0, 1.0, total)[:, None], weights)
    precision = 0  # the most fractional bits for which the largest weight still fits in int16
    while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    return first, taps, np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32), precision


def _resample_uint8(frames, out_size):
    """frames resampled along their first axis."""
    in_size = frames.shape[0]
    first, _, weights, precision = _int16_weights(in_size, out_size)
    x = frames.astype(np.int32)  # 255 * 2**15 * the weights' sum fits
    shape = (-1,) + (1,) * (x.ndim - 1)
    acc = np.int32(1 << (precision - 1))  # the +0.5 of the rounding
    for j in range(weights.shape[1]):
        acc = acc + np.take(x, np.minimum(first + j, in_size - 1), axis=0) * weights[:, j].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def _fused(a, b, c):
    """a * b + c rounded once to float32, as a fused multiply-add computes it."""
    return (np.asarray(a, np.float64) * b + c).astype(np.float32)


def _cubic32(x):
    """Keys' cubic (a = -0.5) in float32, with the multiply-adds fused as torch's compiled
    kernel fuses them."""
    f = np.float32
    x = np.abs(x).astype(f)
    near = _fused(_fused(f(1.5), x, f(-2.5)) * x, x, f(1))
    far = _fused(_fused(_fused(f(-0.5), x, f(2.5)), x, f(-4)), x, f(2))
    return np.where(x < 1, near, np.where(x < 2, far, f(0))).astype(f)


def _float32_weights(in_size, out_size):
    """The float kernel's weights, with its mix of float32 and float64 steps (bit-exact with
    the weights torch uses)."""
    f, d = np.float32, np.float64
    scale = f(in_size) / f(out_size)
    support, invscale = (f(2.0 * d(scale)), f(1.0 / d(scale))) if scale >= 1.0 else (f(2), f(1))
    center = (d(scale) * (np.arange(out_size) + 0.5)).astype(f)
    first = np.maximum(((center - support).astype(d) + 0.5).astype(np.int64), 0)
    taps = np.minimum(((center + support).astype(d) + 0.5).astype(np.int64), in_size) - first
    weights, total = np.zeros((out_size, int(taps.max())), f), np.zeros(out_size, f)
    for j in range(weights.shape[1]):
        x = ((((first + j).astype(f) - center).astype(d) + 0.5) * d(invscale)).astype(f)
        weights[:, j] = np.where(j < taps, _cubic32(x), f(0))
        total += weights[:, j]
    return first, np.where(total[:, None] != 0, weights / np.where(total == 0, f(1), total)[:, None], weights)


def _resample_float(frames, out_size):
    """frames resampled along their first axis, tap by tap, as torch sums them: fused
    multiply-adds when enlarging (bit-exact); when shrinking its order differs from this one, by
    ~1e-5 relative."""
    in_size = frames.shape[0]
    first, weights = _float32_weights(in_size, out_size)
    shape = (-1,) + (1,) * (frames.ndim - 1)
    fused = out_size > in_size
    acc = source = None
    for j in range(weights.shape[1]):
        # one buffer for every tap: fresh memory is a page fault per 4 KB, which costs more here
        # than the arithmetic (mode "clip": with "raise", numpy fills a copy first)
        source = np.take(frames, np.minimum(first + j, in_size - 1), axis=0, out=source, mode="clip")
        weight = weights[:, j].reshape(shape)
        if acc is None:
            acc = source * weight
        elif fused:
            acc = _fused(source, weight, acc)
        else:
            acc += np.multiply(source, weight, out=source)
    return acc
