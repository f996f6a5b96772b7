"""Convert the release's spk_dict.pt (a torch pickle) to a pickle-free spk_dict.safetensors.

    python tools/convert/convert_spk_dict_pt2np.py --spk_path CKPT/spk_dict.pt --out CKPT/spk_dict.safetensors

An --out (or --zip_spk_path, the existing MindSpore port's name for it) ending in .zip is written
in that port's layout (arrays.npz + meta.json); both are read by the model.

The pickle is opened with torch.load(weights_only=True), so it cannot run code; the result is
read back and compared value for value before it replaces anything at --out.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from mindone_ext.models.qwen2_5_omni.speakers import (SpeakerFileError, read_speakers, read_torch_speakers,  # noqa: E402
                                                      read_zip_speakers, save_speakers, save_zip_speakers)


def convert(spk_path, out):
    if not os.path.isfile(spk_path):
        raise SpeakerFileError(f"{spk_path}: file not found")
    speakers = read_torch_speakers(spk_path)
    folder = os.path.dirname(os.path.abspath(out))
    zipped = out.endswith(".zip")
    fd, tmp = tempfile.mkstemp(prefix=".spk-", suffix=".zip" if zipped else ".safetensors", dir=folder)
    os.close(fd)
    try:
        (save_zip_speakers if zipped else save_speakers)(speakers, tmp)
        back = (read_zip_speakers if zipped else read_speakers)(tmp)
        if sorted(back) != sorted(speakers):
            raise SpeakerFileError(f"round trip lost speakers: {sorted(set(speakers) - set(back))}")
        for name, s in speakers.items():
            b = back[name]
            if not (np.array_equal(b.cond, s.cond) and np.array_equal(b.ref_mel, s.ref_mel) and b.bos_token == s.bos_token):
                raise SpeakerFileError(f"round trip changed speaker {name!r}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return sorted(speakers)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spk_path", required=True)
    ap.add_argument("--out", "--zip_spk_path", dest="out", required=True,
                    help="the file to write: .safetensors, or .zip in the existing MindSpore port's layout")
    a = ap.parse_args()
    try:
        names = convert(a.spk_path, a.out)
    except SpeakerFileError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.out}: {len(names)} speakers ({', '.join(names)}), verified equal to {a.spk_path}")


if __name__ == "__main__":
    main()
