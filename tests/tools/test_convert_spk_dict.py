"""The speaker converter: exact round trip, clear refusals, no arbitrary unpickling."""
import os
import pickle
import subprocess
import sys

import numpy as np
import torch

from mindone_ext.models.qwen2_5_omni.speakers import read_speakers
from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "tools", "convert", "convert_spk_dict_pt2np.py")


def convert(src, out):
    return subprocess.run([sys.executable, SCRIPT, "--spk_path", str(src), "--out", str(out)], capture_output=True,
                          text=True, timeout=300)


def test_round_trip_is_exact(tiny_checkpoint, tmp_path):
    out = tmp_path / "spk_dict.safetensors"
    done = convert(os.path.join(tiny_checkpoint, "spk_dict.pt"), out)
    assert done.returncode == 0, done.stderr
    assert "2 speakers (Chelsie, Ethan), verified equal" in done.stdout
    original = torch.load(os.path.join(tiny_checkpoint, "spk_dict.pt"), weights_only=True)
    back = read_speakers(str(out))
    for name, entry in original.items():
        np.testing.assert_array_equal(back[name].cond, entry["cond"].numpy())
        np.testing.assert_array_equal(back[name].ref_mel, entry["ref_mel"].numpy())
        assert back[name].bos_token == entry["bos_token"]
    with open(out, "rb") as f:
        assert b"\x80\x04" not in f.read(64)  # a safetensors header, not a pickle


def test_refuses_a_file_that_is_not_a_speaker_dict(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "model.pt")
    done = convert(tmp_path / "model.pt", tmp_path / "out.safetensors")
    assert done.returncode != 0 and "is not a speaker (needs cond, ref_mel and bos_token)" in done.stderr
    assert not (tmp_path / "out.safetensors").exists() and not list(tmp_path.glob(".spk-*"))
    done = convert(tmp_path / "missing.pt", tmp_path / "out.safetensors")
    assert done.returncode != 0 and "missing.pt: file not found" in done.stderr


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_never_unpickles_arbitrary_objects(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"Chelsie": Exploit()}, f)
    done = subprocess.run([sys.executable, SCRIPT, "--spk_path", str(tmp_path / "evil.pt"), "--out",
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0 and "cannot be read as a speaker dict" in done.stderr
    assert not (tmp_path / "pwned").exists()
