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


def existing_port_file(tiny_checkpoint, path):
    """spk_dict.npy as the existing MindSpore port's converter writes it: the release's dict with
    its tensors as numpy arrays, through np.save (a pickle inside an .npy)."""
    raw = torch.load(os.path.join(tiny_checkpoint, "spk_dict.pt"), weights_only=True)
    np.save(path, {name: {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in entry.items()}
                   for name, entry in raw.items()})
    return raw


def test_the_existing_ports_npy_speaker_file_is_read_without_torch(tiny_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    os.remove(folder / "spk_dict.pt")
    raw = existing_port_file(tiny_checkpoint, folder / "spk_dict.npy")
    code = ("import sys; sys.argv = ['x']; from tests.hide_torch import hide_torch; hide_torch()\n"
            "from mindone_ext.models.qwen2_5_omni.speakers import folder_speaker_file, read_speaker_file\n"
            f"s = read_speaker_file(folder_speaker_file({str(folder)!r}))\n"
            "print(sorted(s), s['Ethan'].bos_token, s['Ethan'].ref_mel.shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    ethan = raw["Ethan"]
    assert done.stdout.split("\n")[0] == f"['Chelsie', 'Ethan'] {int(ethan['bos_token'])} {tuple(ethan['ref_mel'].shape)}"
    from mindone_ext.models.qwen2_5_omni.speakers import read_numpy_speakers

    for name, entry in raw.items():
        np.testing.assert_array_equal(read_numpy_speakers(str(folder / "spk_dict.npy"))[name].cond, entry["cond"].numpy())


def test_an_npy_speaker_file_never_runs_code(tmp_path):
    from mindone_ext.models.qwen2_5_omni.speakers import SpeakerFileError, read_numpy_speakers

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    np.save(tmp_path / "spk_dict.npy", np.array({"Ethan": {"cond": Payload()}}, dtype=object), allow_pickle=True)
    try:
        read_numpy_speakers(str(tmp_path / "spk_dict.npy"))
        raise AssertionError("read")
    except SpeakerFileError as e:
        assert "refusing to load" in str(e) and "system" in str(e)
    assert not marker.exists()


def test_no_usable_speaker_file_says_how_to_convert(tiny_checkpoint, tmp_path):
    from mindone_ext.models.qwen2_5_omni.speakers import no_speakers_message

    message = no_speakers_message(tiny_checkpoint)
    assert "spk_dict.pt needs torch" in message and "convert_spk_dict_pt2np.py --spk_path" in message
    assert "copy the release's spk_dict.pt" in no_speakers_message(str(tmp_path))


def test_the_existing_ports_documented_command_writes_its_zip_and_the_model_reads_it(tiny_checkpoint, tmp_path):
    """`convert_spk_dict_pt2np.py --spk_path .../spk_dict.pt --zip_spk_path .../spk_dict.zip`, as the
    existing MindSpore port documents it: its zip layout (arrays.npz with `<name>/cond` and
    `<name>/ref_mel`, meta.json with `<name>/bos_token`), read back without torch or pickle."""
    import json
    import shutil
    import zipfile

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    done = subprocess.run([sys.executable, SCRIPT, "--spk_path", str(folder / "spk_dict.pt"), "--zip_spk_path",
                           str(folder / "spk_dict.zip")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    original = torch.load(folder / "spk_dict.pt", weights_only=True)
    with zipfile.ZipFile(folder / "spk_dict.zip") as zf:
        assert sorted(zf.namelist()) == ["arrays.npz", "meta.json"]
        meta = json.loads(zf.read("meta.json"))
        with zf.open("arrays.npz") as f:
            arrays = dict(np.load(f, allow_pickle=False))
    assert meta == {f"{name}/bos_token": int(entry["bos_token"]) for name, entry in original.items()}
    assert sorted(arrays) == sorted(f"{name}/{k}" for name in original for k in ("cond", "ref_mel"))
    for name in ("spk_dict.pt", "spk_dict.safetensors"):  # only the zip left
        if os.path.exists(folder / name):
            os.remove(folder / name)
    code = ("import sys; sys.argv = ['x']; from tests.hide_torch import hide_torch; hide_torch()\n"
            "from mindone_ext.models.qwen2_5_omni.speakers import folder_speaker_file, read_speaker_file\n"
            f"s = read_speaker_file(folder_speaker_file({str(folder)!r})); print(sorted(s), s['Ethan'].bos_token)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == f"['Chelsie', 'Ethan'] {int(original['Ethan']['bos_token'])}"
    from mindone_ext.models.qwen2_5_omni.speakers import read_zip_speakers

    back = read_zip_speakers(str(folder / "spk_dict.zip"))
    for name, entry in original.items():
        np.testing.assert_array_equal(back[name].cond, entry["cond"].numpy())
        np.testing.assert_array_equal(back[name].ref_mel, entry["ref_mel"].numpy())


def test_a_speaker_zip_with_pickled_arrays_or_a_bomb_is_refused(tmp_path):
    import zipfile

    from mindone_ext.models.qwen2_5_omni.speakers import SpeakerFileError, read_zip_speakers

    pickled = tmp_path / "pickled.zip"
    inner = tmp_path / "arrays.npz"
    np.savez(inner, **{"Ethan/cond": np.array([{"x": 1}], dtype=object)})
    with zipfile.ZipFile(pickled, "w") as zf:
        zf.write(inner, "arrays.npz")
        zf.writestr("meta.json", '{"Ethan/bos_token": 3}')
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("meta.json", b"0" * (300 << 20))
    (tmp_path / "text.zip").write_text("hello")
    for path, words in ((pickled, "Object arrays cannot be loaded"), (bomb, "unpacks to more than 256 MB"),
                        (tmp_path / "arrays.npz", "not a speaker dict"), (tmp_path / "text.zip", "File is not a zip file")):
        try:
            read_zip_speakers(str(path))
            raise AssertionError(f"{path} read")
        except SpeakerFileError as e:
            assert words in str(e), e


def test_model_load_speakers_adds_a_voice_from_each_file_kind_as_the_reference_does(tiny_checkpoint, tmp_path):
    """model.load_speakers(path), the reference's method: a custom voice (Chelsie's arrays under a
    new name) from a .pt, .safetensors, .zip or .npy file; the reference reads the same arrays from
    the .pt; the voice answers as Chelsie does; files that cannot be a voice are refused by name."""
    import re
    import shutil

    import pytest
    from transformers import Qwen2_5OmniForConditionalGeneration as Reference

    from mindone_ext import Qwen2_5OmniForConditionalGeneration
    from mindone_ext.models.qwen2_5_omni.speakers import SpeakerFileError, save_speakers, save_zip_speakers

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint)
    chelsie = torch.load(os.path.join(tiny_checkpoint, "spk_dict.pt"), weights_only=True)["Chelsie"]
    torch.save({"Custom": chelsie}, tmp_path / "custom.pt")
    custom = {"Custom": model.speakers["Chelsie"]}
    save_speakers(custom, str(tmp_path / "custom.safetensors"))
    save_zip_speakers(custom, str(tmp_path / "custom.zip"))
    np.save(tmp_path / "custom.npy", {"Custom": {k: v.numpy() if hasattr(v, "numpy") else v for k, v in chelsie.items()}},
            allow_pickle=True)
    reference = Reference.from_pretrained(tiny_checkpoint)
    reference.load_speakers(str(tmp_path / "custom.pt"))
    want = reference.speaker_map["Custom"]
    for kind in ("pt", "safetensors", "zip", "npy"):
        model.speakers.pop("Custom", None)
        assert model.load_speakers(str(tmp_path / f"custom.{kind}")) == ["Custom"]
        got = model.speakers["Custom"]
        np.testing.assert_array_equal(got.cond, want["cond"].float().numpy())
        np.testing.assert_array_equal(got.ref_mel, want["ref_mel"].float().numpy())
        assert got.bos_token == int(want["bos_token"]) and sorted(model.speakers) == ["Chelsie", "Custom", "Ethan"]

    ids = np.array([[1, 2, 3]])
    voices = [model.generate(input_ids=ids, eos_token_id=[], max_new_tokens=4, talker_max_new_tokens=20, seed=3,
                             spk=name)[1].asnumpy() for name in ("Custom", "Chelsie")]
    assert len(voices[0]) > 0
    np.testing.assert_array_equal(*voices)

    wrong = {"Small": model.speakers["Chelsie"].__class__(np.zeros((1, 8), np.float32), chelsie["ref_mel"].numpy(), 1)}
    save_speakers(wrong, str(tmp_path / "small.safetensors"))
    for path, words in ((tmp_path / "small.safetensors", "speaker 'Small' has cond (1, 8)"),
                        (tmp_path / "none.zip", "none.zip: file not found"),
                        (tmp_path / "voice.wav", "not a speaker file kind")):
        with pytest.raises(SpeakerFileError, match=re.escape(words)):
            model.load_speakers(str(path))
    assert sorted(model.speakers) == ["Chelsie", "Custom", "Ethan"]  # a refused file adds nothing

    folder = tmp_path / "wrong_voices"  # a checkpoint whose speaker file does not fit its Token2Wav
    folder.mkdir()
    for name in os.listdir(tiny_checkpoint):
        if not name.startswith("spk_dict"):
            shutil.copy(os.path.join(tiny_checkpoint, name), folder / name)
    save_speakers(wrong, str(folder / "spk_dict.safetensors"))
    with pytest.raises(SpeakerFileError, match=re.escape(f"{folder / 'spk_dict.safetensors'}: speaker 'Small'")):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(str(folder))
    assert Qwen2_5OmniForConditionalGeneration.from_pretrained(str(folder), enable_audio_output=False).speakers == {}
    model.disable_talker()
    with pytest.raises(ValueError, match="enable_audio_output=True"):
        model.load_speakers(str(tmp_path / "custom.safetensors"))
