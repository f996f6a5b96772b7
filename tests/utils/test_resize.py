"""utils/resize.py against torchvision's antialiased bicubic resize (the reference's), run in the
reference media environment: every output size from 1 to past twice the input on each axis,
shrinking and enlarging, uint8 (torch's integer kernel, as torchvision's v2 resize runs it for
transformers' image processors: bit-exact) and float (bit-exact when
enlarging, within 1e-4 on a 0-255 scale when shrinking: torch sums the taps in another order)."""
import subprocess

import numpy as np

from mindone_ext.utils.resize import resize, resize_rounded
from tests.reference_media.environment import reference_environ, reference_python

TORCHVISION = """
import sys
import numpy as np, torch
import torchvision.transforms.v2.functional as F
frames, sizes, out = sys.argv[1:4]
x = np.load(frames)
sizes = np.load(sizes)
results = {}
for kind, data in (("uint8", x), ("float", x.astype(np.float32))):
    for h, w in sizes:
        try:
            t = F.resize(torch.from_numpy(np.ascontiguousarray(data.transpose(2, 0, 1))), [int(h), int(w)],
                         F.InterpolationMode.BICUBIC, antialias=True)
        except RuntimeError as e:  # torch's own failures (an assert of its uint8 kernel at some sizes)
            print(kind, h, w, str(e).splitlines()[0])
            continue
        results[f"{kind}_{h}_{w}"] = t.permute(1, 2, 0).numpy()
np.savez(out, **results)
"""


def test_resize_equals_torchvision_at_every_size_near_the_input_and_down_to_one(tmp_path):
    frame = np.random.default_rng(0).integers(0, 256, (13, 17, 3)).astype(np.uint8)
    frame[4:9, 5:12] = 255  # a sharp edge, where kernels that differ show it most
    sizes = [(h, 17) for h in range(1, 30)] + [(13, w) for w in range(1, 38)] + [(1, 1), (5, 40), (27, 6)]
    np.save(tmp_path / "frame.npy", frame)
    np.save(tmp_path / "sizes.npy", np.array(sizes))
    done = subprocess.run([reference_python(), "-c", TORCHVISION, str(tmp_path / "frame.npy"), str(tmp_path / "sizes.npy"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, env=reference_environ(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    want = np.load(tmp_path / "out.npz")
    floats = frame.astype(np.float32)
    # torch 2.14's uint8 kernel fails an internal assert at 1 x 1, and nowhere else
    assert {key for key in (f"{kind}_{h}_{w}" for kind in ("uint8", "float") for h, w in sizes)} - set(want.files) \
        <= {"uint8_1_1"}, done.stdout
    for h, w in sizes:
        if f"uint8_{h}_{w}" in want.files:
            np.testing.assert_array_equal(resize(frame, h, w), want[f"uint8_{h}_{w}"], err_msg=f"uint8 {h} x {w}")
        got, expected = resize(floats, h, w), want[f"float_{h}_{w}"]
        assert got.shape == expected.shape == (h, w, 3) and got.dtype == np.float32, (h, w, got.shape)
        if h >= 13 and w >= 17:
            np.testing.assert_array_equal(got, expected, err_msg=f"float {h} x {w} (enlarging)")
        else:
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4, err_msg=f"float {h} x {w}")
        # video frames, as qwen-omni-utils rounds them: equal but where torch's value lies within
        # the float kernels' difference of a half
        rounded, want_rounded = resize_rounded(frame, h, w), np.round(np.clip(expected, 0, 255))
        differ = rounded != want_rounded
        assert np.all(np.abs(np.abs(expected[differ] - np.floor(expected[differ])) - 0.5) < 1e-4), (h, w)
        # a stack resizes frame by frame
        np.testing.assert_array_equal(resize(np.stack([frame, frame[::-1]]), h, w)[1], resize(frame[::-1], h, w))
