"""A Hugging Face checkpoint folder as it is on disk: config.json plus safetensors weights,
either one file or shards listed by `model.safetensors.index.json`, loaded by name into
MindSpore parameters."""
import json
import logging
import os

import numpy as np

from .notice import progress
from .safetensors_io import SafetensorsFile, round_to_bf16

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message names what is wrong."""


class CheckpointFolder:
    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"checkpoint folder {self.path!r} does not exist or is not a folder")
        self.config_path = self.inside("config.json")
        if not os.path.isfile(self.config_path):
            raise CheckpointError(f"{self.path!r} has no config.json: not a Hugging Face checkpoint folder")
        self._files = {}
        self.weight_map = self._weight_map()

    def _weight_map(self):
        index = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
            for shard in set(weight_map.values()):
                self.inside(shard)
            missing = sorted({s for s in weight_map.values() if not os.path.isfile(os.path.join(self.path, s))})
            if missing:
                raise CheckpointError(f"{self.path!r}: {INDEX_FILE} lists shard(s) that are missing: {', '.join(missing)}")
            return dict(weight_map)
        names = [SINGLE_FILE] if os.path.isfile(os.path.join(self.path, SINGLE_FILE)) else sorted(
            f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not names:
            found = ", ".join(sorted(os.listdir(self.path))) or "nothing"
            raise CheckpointError(f"{self.path!r} has no weights: expected {SINGLE_FILE} or {INDEX_FILE} "
                                  f"(found: {found})")
        weight_map = {}
        for name in names:
            for key in self._open(name).keys():
                weight_map[key] = name
        return weight_map

    def _open(self, shard):
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(self.inside(shard))
        return self._files[shard]

    def inside(self, name):
        """The path of file `name` of this folder; refuses a name or a symlink that leads out of it
        (a Hugging Face cache snapshot's links into its repository's blobs/ are the exception)."""
        path = os.path.join(self.path, name)
        if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
            raise CheckpointError(f"{self.path!r}: file name {name!r} points outside the checkpoint folder")
        real, folder = os.path.realpath(path), os.path.realpath(self.path)
        allowed = [folder]
        if os.path.basename(os.path.dirname(folder)) == "snapshots":  # <repo>/snapshots/<revision>
            allowed.append(os.path.join(os.path.dirname(os.path.dirname(folder)), "blobs"))
        if not any(os.path.commonpath([real, root]) == root for root in allowed):
            raise CheckpointError(f"{path}: a link to {real}, outside the checkpoint folder")
        return path

    def keys(self):
        return self.weight_map.keys()

    def shape(self, name):
        return self._open(self.weight_map[name]).shape(name)

    def dtype_name(self, name):
        """How the tensor is stored: "F32", "BF16", ... (safetensors' names)."""
        return self._open(self.weight_map[name]).dtype_name(name)

    def get(self, name):
        return self._open(self.weight_map[name]).get(name)

    def read_json(self, filename):
        path = self.inside(filename)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested too deeply
            raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None


def _listing(title, names, limit=20):
    names = sorted(names)
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"{title} ({len(names)}): {shown}"


def load_into(cell, folder, requested_dtype, skip_prefixes=(), optional=()):
    """Copy every checkpoint tensor into the parameter of the same name.

    Tensors whose name starts with one of `skip_prefixes` are not read at all. Parameters
    named in `optional` (tied weights) may be absent. Anything missing, unexpected or of the
    wrong shape is reported in one CheckpointError before any parameter is touched.
    """
    params = dict(cell.parameters_and_names())
    wanted = {k for k in folder.keys() if not k.startswith(tuple(skip_prefixes))}
    missing = set(params) - wanted - set(optional)
    unexpected = wanted - set(params)
    wrong = [f"{k} (checkpoint {list(folder.shape(k))}, model {list(params[k].shape)})"
             for k in sorted(wanted & set(params)) if tuple(folder.shape(k)) != tuple(params[k].shape)]
    problems = [_listing(t, n) for t, n in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                            ("tensors with the wrong shape", wrong)) if n]
    if problems:
        raise CheckpointError(f"checkpoint {folder.path!r} does not match the model:\n  " + "\n  ".join(problems))
    import mindspore as ms  # here, not above: the converters read checkpoints without MindSpore

    bf16_on_cpu = requested_dtype == ms.bfloat16
    # shard by shard (each file read once, in order), with a progress bar when a person watches
    names = sorted(wanted, key=lambda n: (folder.weight_map.get(n, ""), n))
    for name in progress(names, f"loading {os.path.basename(os.path.normpath(folder.path))}", "tensor"):
        param = params[name]
        value = folder.get(name)
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(np.float32)
            if bf16_on_cpu and param.dtype == ms.float32:
                value = round_to_bf16(value)  # bf16 weights, float32 compute (no bf16 matmul on CPU)
        param.set_data(ms.Tensor(value, dtype=param.dtype))
    logger.info("loaded %d tensors from %s", len(wanted), folder.path)
