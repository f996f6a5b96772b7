"""Video reading: the frames asked for, in the order asked, and memory bounded by the frames kept
(a long video is never decoded whole into memory)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindone_ext.utils.media import MediaError
from mindone_ext.utils.video import read_frames
from tests.conftest import ROOT
from tests.reference_media import real_media as rm


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    if rm.missing_tools():
        pytest.fail(f"these tests need {rm.missing_tools()} (apt-get install espeak-ng sox ffmpeg)")
    return rm.video(str(tmp_path_factory.mktemp("video") / "clip.mp4"), 96, 64, 10, 3.3)


def all_frames(path):
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_frames_come_back_as_asked_unsorted_and_repeated(clip):
    every = all_frames(clip)
    asked = [32, 0, 5, 5, 17, 1, 32]
    frames = read_frames(clip, lambda total, fps, height, width: (asked, lambda frame: frame))
    np.testing.assert_array_equal(frames, every[asked])


def test_the_plan_sees_decords_count_rate_and_size(clip, tmp_path):
    seen = {}

    def plan(total, fps, height, width):
        seen.update(total=total, fps=fps, size=(height, width))
        return [total - 1], lambda frame: frame[:2]

    assert read_frames(clip, plan).shape == (1, 2, 96, 3)
    assert seen == {"total": 33, "fps": 10.0, "size": (64, 96)}
    # a raw H.264 stream declares no frame count: its packets are counted
    raw = str(tmp_path / "clip.h264")
    rm.ffmpeg("-i", clip, "-c:v", "copy", "-bsf:v", "h264_mp4toannexb", "-f", "h264", raw)
    read_frames(raw, plan)
    assert seen["total"] == 33


def test_a_frame_past_the_end_or_a_broken_file_is_a_clear_error(clip, tmp_path):
    with pytest.raises(MediaError, match="declares 33 frames but frame 40 could not be decoded"):
        read_frames(clip, lambda total, fps, height, width: ([40], lambda frame: frame))
    truncated = tmp_path / "truncated.mp4"
    with open(clip, "rb") as f:
        truncated.write_bytes(f.read()[:2000])
    with pytest.raises(MediaError, match="truncated.mp4"):
        read_frames(str(truncated), lambda total, fps, height, width: ([0, 30], lambda frame: frame))


PEAK = """
import json, resource, sys
from mindone_ext.models.qwen2_5_omni.mm_info import fetch_video
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
before = peak()
frames, rate = fetch_video(sys.argv[1], {})
print(json.dumps({"before": before, "after": peak(), "shape": frames.shape, "nbytes": frames.nbytes}))
"""


def test_a_long_video_costs_the_frames_kept_not_the_frames_in_the_file(tmp_path):
    """30 s of 640x360 at 30 fps: 900 frames, 622 MB decoded whole. At 2 frames a second 60 are
    kept (169 MB as the float32 frames returned): the peak grows by about that, not by the file."""
    path = rm.video(str(tmp_path / "long.mp4"), 640, 360, 30, 30,
                    codec=("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"))
    whole = 900 * 360 * 640 * 3
    run = subprocess.run([sys.executable, "-c", PEAK, path], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["shape"] == [60, 3, 364, 644]
    growth = result["after"] - result["before"]
    # the kept frames as uint8 while decoding, then as float32, and one frame's work in flight
    assert growth < 1.5 * result["nbytes"] + 64 * 2 ** 20, (growth, result["nbytes"])
    assert growth < whole / 2, (growth, whole)
