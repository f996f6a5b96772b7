"""Speaker voices for Token2Wav: per speaker a condition vector, a reference mel spectrogram and
the text-side bos token the Talker starts from.

The release ships them as `spk_dict.pt` (a torch pickle). Inference reads a pickle-free
`spk_dict.safetensors` instead (tensors `<name>.cond`, `<name>.ref_mel`; the bos ids in the
metadata), written by tools/convert/convert_spk_dict_pt2np.py; `spk_dict.pt` is read only when
torch happens to be installed, with `weights_only=True`.
"""
import importlib.util
import json
import os
from dataclasses import dataclass

import numpy as np

from ...utils.safetensors_io import SafetensorsFile, save_file

SAFE_NAME, TORCH_NAME = "spk_dict.safetensors", "spk_dict.pt"


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


def load_speakers(folder):
    """Speakers of a checkpoint folder: the safetensors file, else spk_dict.pt if torch is
    installed, else none (text-only use needs none)."""
    safe, pickled = os.path.join(folder, SAFE_NAME), os.path.join(folder, TORCH_NAME)
    if os.path.isfile(safe):
        return read_speakers(safe)
    if os.path.isfile(pickled) and importlib.util.find_spec("torch") is not None:
        return read_torch_speakers(pickled)
    return {}
