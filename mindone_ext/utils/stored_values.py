"""Values computed once per machine: the result of a deterministic computation kept on disk beside
the stored graphs (utils/graph_cache.py), under a key of everything it depends on: the arrays it is
computed from (their bytes, shapes and dtypes), its other settings, this package's source,
MindSpore's version and the device.

A speaker's ECAPA embedding is one: it depends only on the checkpoint's ECAPA weights and the
speaker's reference mel, so a new process's first answer in a voice reads it instead of running the
encoder (on the tiny checkpoint the encoder graph's first call, ~43 ms of a ~1 s cold answer).

Stored and switched off with the graphs ($MINDONE_EXT_GRAPH_CACHE; "off" computes every time). A
value is written under a temporary name and renamed, so a killed or concurrent process never
leaves half a file under a key; a file that does not load is computed again and replaced; a folder
that cannot be written leaves values computed in each process, with a warning.
"""
import hashlib
import os
import warnings

import mindspore as ms
import numpy as np

from .atomic_file import written_atomically
from .graph_cache import ENV, cache_folder, source_hash

FOLDER = "values"  # inside the graphs' folder


def value_key(name, arrays, settings=()):
    """The file name (without extension) of `name`'s value for these inputs."""
    digest = hashlib.sha256()
    for part in (name, repr(settings), source_hash(), ms.__version__, ms.get_context("device_target")):
        digest.update(str(part).encode() + b"\0")
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode() + b"\0")
        digest.update(array.data)
    return f"{name}-{digest.hexdigest()[:32]}"


def stored_value(name, arrays, settings, compute):
    """`compute()` (-> a numpy array), a pure function of `arrays` (numpy) and `settings` (a
    repr-able value), computed once per machine and read from disk afterwards."""
    folder = cache_folder()
    if folder is None:
        return compute()
    path = os.path.join(folder, FOLDER, value_key(name, arrays, settings) + ".npy")
    if os.path.exists(path):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            pass  # unreadable (e.g. a disk filled up while it was written): computed again below
    value = np.asarray(compute())
    try:
        with written_atomically(path) as temporary, open(temporary, "wb") as f:
            np.save(f, value, allow_pickle=False)
    except OSError as error:
        warnings.warn(f"values are not stored ({error}); set {ENV} to a writable folder, or to off")
    return value
