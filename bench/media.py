"""A long video read for the model, ours against the reference's reader (qwen-omni-utils'
fetch_video with decord, in its own environment), same file, same run.

    python bench/media.py                  # a generated 10-minute 720p clip at 30 fps
    python bench/media.py --minutes 0.5    # a quick run

Each side runs in a fresh process; prints one JSON line per side (seconds, peak RSS in MB, the
frames' shape and sample rate; then the processor's seconds making them the vision encoder's
patches, and their grid) and a summary line: ratios ours / reference (below 1 = less) and how the
frames compare (largest difference in 0-255 levels, share of values that differ) and the patches.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), ROOT]
from common import emit  # noqa: E402
from tests.reference_media import real_media  # noqa: E402
from tests.reference_media.environment import reference_environ, reference_python  # noqa: E402
from mindone_ext.bundled import CHECKPOINT  # noqa: E402  (its processor files)

READ = """
import json, sys, time
import numpy as np
path, side, sample, folder = sys.argv[1:5]
start = time.perf_counter()
if side == "mindone_ext":
    from mindone_ext.models.qwen2_5_omni.mm_info import fetch_video
    frames, rate = fetch_video(path, {})
else:
    from qwen_omni_utils.v2_5.vision_process import fetch_video
    import torch
    frames, rate = fetch_video({"video": path}, return_video_sample_fps=True)
    frames = frames.numpy()
seconds = time.perf_counter() - start
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
np.save(sample, frames[::max(1, len(frames) // 8)])
if side == "mindone_ext":  # then the processor makes the frames the vision encoder's patches
    from mindone_ext import Qwen2_5OmniProcessor
    processor = Qwen2_5OmniProcessor.from_pretrained(folder)
    start = time.perf_counter()
    patches, grid = processor.video_processor(frames)
else:
    from transformers import Qwen2_5OmniProcessor
    processor = Qwen2_5OmniProcessor.from_pretrained(folder)
    start = time.perf_counter()
    out = processor.video_processor(videos=[torch.from_numpy(frames)], return_tensors="pt")
    patches, grid = out["pixel_values_videos"].numpy(), out["video_grid_thw"].numpy()[0]
processor_seconds = time.perf_counter() - start
np.save(sample.replace(".npy", "_patches.npy"), patches[::max(1, len(patches) // 4096)])
print(json.dumps({"bench": "media", "impl": side, "seconds": round(seconds, 2), "peak_rss_mb": round(peak), "frames": frames.shape,
                  "sample_fps": rate, "processor_seconds": round(processor_seconds, 2), "grid": [int(g) for g in grid]}))
"""


def read(python, side, path, folder):
    """Run one side in a fresh process: its result line, a sample of its frames and of its patches."""
    sample = os.path.join(folder, f"{side}.npy")
    run = subprocess.run([python, "-c", READ, path, side, sample, CHECKPOINT], capture_output=True, text=True,
                         env=reference_environ(PYTHONPATH=ROOT))
    if run.returncode:
        raise SystemExit(f"{side} failed:\n{run.stderr[-3000:]}")
    return (json.loads(run.stdout.strip().splitlines()[-1]), np.load(sample),
            np.load(sample.replace(".npy", "_patches.npy")))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mindone_ext_bench_media"))
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    path = os.path.join(a.workdir, f"clip_{a.width}x{a.height}_{a.fps}fps_{a.minutes:g}min.mp4")
    if not os.path.exists(path):  # H.264, one keyframe every 10 s as cameras and encoders commonly do
        real_media.video(path + ".part.mp4", a.width, a.height, a.fps, a.minutes * 60,
                         codec=("-c:v", "libx264", "-preset", "ultrafast", "-g", str(10 * a.fps), "-pix_fmt", "yuv420p"))
        os.replace(path + ".part.mp4", path)
    whole_gb = a.minutes * 60 * a.fps * a.width * a.height * 3 / 1e9
    ours, our_frames, our_patches = read(sys.executable, "mindone_ext", path, a.workdir)
    reference, reference_frames, reference_patches = read(reference_python(), "qwen_omni_utils", path, a.workdir)
    emit({**ours, "decoded_whole_gb": round(whole_gb, 1)})
    emit(reference)
    difference = np.abs(our_frames.astype(np.float64) - reference_frames)
    emit({"bench": "media", "ratio_seconds": round(ours["seconds"] / reference["seconds"], 2),
          "ratio_peak_rss": round(ours["peak_rss_mb"] / reference["peak_rss_mb"], 2),
          "ratio_processor_seconds": round(ours["processor_seconds"] / reference["processor_seconds"], 2),
          "same_shape": ours["frames"] == reference["frames"], "same_sample_fps": ours["sample_fps"] == reference["sample_fps"],
          "same_grid": ours["grid"] == reference["grid"],
          "max_level_difference": float(difference.max()), "share_differing": float(np.mean(difference > 0)),
          "patches_max_difference": float(np.abs(our_patches - reference_patches).max())})


if __name__ == "__main__":
    main()
