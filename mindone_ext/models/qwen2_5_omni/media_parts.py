"""A prompt's media cut into parts the encoders take apart (EncodeRequests), so an answer's start
encodes them between other answers' steps (the voice server) instead of in one go.

Exact by construction, to float rounding (matmuls over other row counts, ~1e-6):
- the audio encoder attends within windows of 2 * n_window mel frames and pools pairs of a
  window's tokens (a whole window has an even count), so a clip cut at whole windows gives its
  tokens part after part;
- the vision encoder attends within a temporal frame (its window blocks and its full-attention
  blocks alike) and merges patches within one, so an image or a video cut at frames gives its
  tokens part after part.
"""
import numpy as np

from .audio_encoder import output_lengths
from .prefills import EncodeRequest

AUDIO_PART_WINDOWS = 4  # 8 s of audio in the released model (the encoder's graphs: per power of two of windows)
VISION_PART_PATCHES = 1024  # a 448 x 448 image; a video's frames grouped up to this many patches (one at least)


def audio_request(tower, features):
    """A clip (or a part of one) of log-mel `features` (num_mel_bins, frames) for the audio encoder."""
    return EncodeRequest(tower, features, int(output_lengths([features.shape[1]])[1][0]))


def audio_parts(tower, clips):
    """Each clip's frames (num_mel_bins, frames) in parts of AUDIO_PART_WINDOWS windows. A last part
    of 1-2 frames gives no token after pooling (as in the reference): it is left out."""
    step = AUDIO_PART_WINDOWS * 2 * tower.n_window
    parts = [audio_request(tower, clip[:, lo:lo + step]) for clip in clips for lo in range(0, clip.shape[1], step)]
    return [part for part in parts if part.tokens > 0]


def vision_parts(visual, pixel_values, grid_thw, what):
    """Each image or video of `grid_thw` (items, 3) as parts of whole temporal frames, up to
    VISION_PART_PATCHES patches each (a frame larger than that is a part by itself)."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    if len(pixel_values) != grid.prod(1).sum():
        raise ValueError(f"{what} pixel values and grid do not match: {len(pixel_values)} patch rows, "
                         f"{grid.prod(1).sum()} in the grid_thw")
    unit, parts, start = visual.merge ** 2, [], 0
    for t, h, w in grid.tolist():
        frame = h * w
        step = max(1, VISION_PART_PATCHES // frame)
        for f in range(0, t, step):
            n = min(step, t - f)
            rows = pixel_values[start + f * frame:start + (f + n) * frame]
            parts.append(EncodeRequest(visual, (rows, (n, h, w)), n * frame // unit))
        start += t * frame
    return parts
