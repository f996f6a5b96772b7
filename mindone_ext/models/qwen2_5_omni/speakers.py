"""Speaker voices for Token2Wav: per speaker a condition vector, a reference mel spectrogram and
the text-side bos token the Talker starts from.

The release ships them as `spk_dict.pt` (a torch pickle). Read, in this order:
- `spk_dict.safetensors`, pickle-free (tensors `<name>.cond`, `<name>.ref_mel`; the bos ids in
  the metadata), written by tools/convert/convert_spk_dict_pt2np.py;
- `spk_dict.zip`, what the existing MindSpore port's converter writes now (`arrays.npz` with
  `<name>/cond`, `<name>/ref_mel`; `meta.json` with `<name>/bos_token`), read without pickle;
- `spk_dict.npy`, what its earlier converter wrote (`np.save` of the dict): its pickle is read
  with an unpickler that builds numpy arrays and nothing else;
- `spk_dict.pt`, when torch happens to be installed, with `weights_only=True`.
"""
import importlib
import importlib.util
import io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np

from ...utils.safetensors_io import SafetensorsFile, save_file

SAFE_NAME, ZIP_NAME, NUMPY_NAME, TORCH_NAME = "spk_dict.safetensors", "spk_dict.zip", "spk_dict.npy", "spk_dict.pt"
ZIP_LIMIT = 256 << 20  # bytes a speaker zip may unpack to (the release's two voices: ~1 MB)


@dataclass
class Speaker:
    cond: np.ndarray  # (1, enc_emb_dim)
    ref_mel: np.ndarray  # (1, frames, mel_dim)
    bos_token: int


class SpeakerFileError(ValueError):
    pass


def speakers_from_dict(raw, source):
    """Validate a {name: {"cond", "ref_mel", "bos_token"}} mapping (values numpy-convertible)."""
    if not isinstance(raw, dict) or not raw:
        raise SpeakerFileError(f"{source}: not a speaker dict (expected {{name: {{cond, ref_mel, bos_token}}}})")
    speakers = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not isinstance(entry, dict) or not {"cond", "ref_mel", "bos_token"} <= set(entry):
            raise SpeakerFileError(f"{source}: entry {name!r} is not a speaker (needs cond, ref_mel and bos_token)")
        cond, ref_mel = (np.asarray(entry[k], np.float32) for k in ("cond", "ref_mel"))
        bos = entry["bos_token"]
        bos = int(bos.item() if hasattr(bos, "item") else bos)
        if cond.ndim != 2 or ref_mel.ndim != 3:
            raise SpeakerFileError(f"{source}: speaker {name!r} has cond {cond.shape} / ref_mel {ref_mel.shape}; "
                                   "expected (1, dim) and (1, frames, mel_dim)")
        speakers[name] = Speaker(cond, ref_mel, bos)
    return speakers


def save_speakers(speakers, path):
    tensors, meta = {}, {}
    for name, s in speakers.items():
        tensors[f"{name}.cond"], tensors[f"{name}.ref_mel"] = s.cond, s.ref_mel
        meta[f"{name}.bos_token"] = str(s.bos_token)
    save_file(tensors, path, metadata={"format": "speakers", "names": json.dumps(sorted(speakers)), **meta})


def save_zip_speakers(speakers, path):
    """The existing MindSpore port's zip layout, for its users' tools."""
    arrays = {f"{name}/{field}": getattr(s, field) for name, s in speakers.items() for field in ("cond", "ref_mel")}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arrays.npz", buffer.getvalue())
        zf.writestr("meta.json", json.dumps({f"{name}/bos_token": s.bos_token for name, s in speakers.items()}))


def read_zip_speakers(path):
    """spk_dict.zip: arrays through np.load(allow_pickle=False), the rest JSON; nothing runs code."""
    try:
        with zipfile.ZipFile(path) as zf:
            if sum(info.file_size for info in zf.infolist()) > ZIP_LIMIT:
                raise SpeakerFileError(f"{path}: unpacks to more than {ZIP_LIMIT >> 20} MB; not a speaker file")
            flat = json.loads(zf.read("meta.json")) if "meta.json" in zf.namelist() else {}
            if "arrays.npz" in zf.namelist():
                with np.load(io.BytesIO(zf.read("arrays.npz")), allow_pickle=False) as arrays:
                    flat.update({key: arrays[key] for key in arrays.files})
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise SpeakerFileError(f"{path}: cannot be read as a speaker zip ({type(e).__name__}: {e})") from None
    nested = {}
    for key, value in flat.items():
        name, _, field = key.rpartition("/")
        nested.setdefault(name, {})[field] = value
    return speakers_from_dict(nested, path)


def read_speakers(path):
    f = SafetensorsFile(path)
    try:
        names = json.loads(f.metadata["names"])
        return {n: Speaker(f.get(f"{n}.cond"), f.get(f"{n}.ref_mel"), int(f.metadata[f"{n}.bos_token"]))
                for n in names}
    except (KeyError, ValueError) as e:
        raise SpeakerFileError(f"{path}: not a speaker file ({e})") from None


def read_torch_speakers(path):
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal or a corrupt file: both mean "not usable"
        raise SpeakerFileError(f"{path}: cannot be read as a speaker dict ({type(e).__name__}: {e})") from None
    raw = {k: {kk: (vv.float().numpy() if hasattr(vv, "numpy") else vv) for kk, vv in v.items()}
           if isinstance(v, dict) else v for k, v in raw.items()} if isinstance(raw, dict) else raw
    return speakers_from_dict(raw, path)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, numbers, strings, lists and dicts; refuses every other class (a
    pickle can name any function to call: os.system as well as numpy's array rebuilder)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype")} | {(m, n) for m in ("numpy.core.multiarray",
                                                                              "numpy._core.multiarray")
                                                              for n in ("_reconstruct", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            try:
                return getattr(importlib.import_module(module), name)
            except ImportError:  # a file written under numpy 2 (numpy._core), read under numpy 1
                return getattr(importlib.import_module(module.replace("numpy._core", "numpy.core")), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a speaker file holds arrays only")


def read_numpy_speakers(path):
    """`np.save` of the speaker dict (an object array holding it), read without running code."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            raw = _ArraysOnly(f).load() if dtype.hasobject else None
    except (ValueError, OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise SpeakerFileError(f"{path}: cannot be read as a speaker dict ({type(e).__name__}: {e})") from None
    if not isinstance(raw, np.ndarray) or shape != () or raw.shape != ():
        raise SpeakerFileError(f"{path}: not a saved speaker dict (expected np.save of a dict)")
    return speakers_from_dict(raw.item(), path)


def read_speaker_file(path):
    """The speakers of one file, read by its kind (.safetensors, .zip, .npy, .pt as above)."""
    readers = {".safetensors": read_speakers, ".zip": read_zip_speakers, ".npy": read_numpy_speakers,
               ".pt": read_torch_speakers}
    reader = readers.get(os.path.splitext(path)[1].lower())
    if reader is None:
        raise SpeakerFileError(f"{path}: not a speaker file kind ({', '.join(readers)})")
    if not os.path.isfile(path):
        raise SpeakerFileError(f"{path}: file not found")
    if reader is read_torch_speakers and importlib.util.find_spec("torch") is None:
        raise SpeakerFileError(f"{path} needs torch to be read; convert it once (with torch installed anywhere): "
                               f"python tools/convert/convert_spk_dict_pt2np.py --spk_path {path} --out "
                               f"{os.path.splitext(path)[0]}.safetensors")
    return reader(path)


def check_speakers(speakers, cond_dim, mel_dim, source):
    """Speakers whose arrays fit a Token2Wav of these sizes, or SpeakerFileError naming the first that does not."""
    for name, s in speakers.items():
        if s.cond.shape[1] != cond_dim or s.ref_mel.shape[2] != mel_dim:
            raise SpeakerFileError(f"{source}: speaker {name!r} has cond {s.cond.shape} / ref_mel {s.ref_mel.shape}; "
                                   f"this model's Token2Wav takes (1, {cond_dim}) and (1, frames, {mel_dim})")
    return speakers


def folder_speaker_file(folder):
    """The first usable speaker file of a checkpoint folder (see the module's docstring), or None."""
    for name in (SAFE_NAME, ZIP_NAME, NUMPY_NAME, TORCH_NAME):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and (name != TORCH_NAME or importlib.util.find_spec("torch") is not None):
            return path
    return None


def no_speakers_message(folder):
    """Why a checkpoint folder gives no voices, and what to run."""
    pickled = os.path.join(folder, TORCH_NAME)
    if os.path.isfile(pickled):
        return (f"{folder} has no usable speaker file: {TORCH_NAME} needs torch to be read. Convert it once "
                f"(with torch installed anywhere): python tools/convert/convert_spk_dict_pt2np.py --spk_path {pickled} "
                f"--out {os.path.join(folder, SAFE_NAME)}")
    return (f"{folder} has no speaker file ({SAFE_NAME}, {ZIP_NAME}, {NUMPY_NAME} or {TORCH_NAME}): copy the release's "
            f"{TORCH_NAME} into it")
