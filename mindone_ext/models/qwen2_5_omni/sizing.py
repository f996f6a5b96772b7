"""The size an image or a video's frames are resized to: multiples of `factor` (patch * merge =
28), within a pixel budget, the aspect ratio kept as well as that allows. Computed exactly as the
reference computes it, in its two slightly different versions: transformers' processors floor a
side to at least one factor when shrinking; qwen-omni-utils (`utils=True`) rounds a side to at
least one factor before checking the budget."""
import math

MAX_RATIO = 200


def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280, utils=False):
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) is more than max_pixels ({max_pixels})")
    if min(height, width) <= 0 or max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"a {width} x {height} image: the longer side must be less than {MAX_RATIO} times the "
                         "shorter one")
    at_least = (lambda side: max(factor, side)) if utils else (lambda side: side)
    h_bar, w_bar = at_least(round(height / factor) * factor), at_least(round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        shrunk = (lambda side: side) if utils else (lambda side: max(factor, side))
        h_bar = shrunk(math.floor(height / beta / factor) * factor)
        w_bar = shrunk(math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
