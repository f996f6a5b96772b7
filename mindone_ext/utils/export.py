"""Writing Hugging Face checkpoint folders: safetensors shards with their index, streamed one tensor
at a time, built in a hidden folder beside the destination and renamed into place only when
complete, so the destination is either a whole checkpoint or untouched."""
import contextlib
import fnmatch
import json
import os
import re
import shutil
import tempfile

from .checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError
from .safetensors_io import tensor_nbytes, write_file

SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Files of a checkpoint folder that are weights (rewritten, never copied); everything else
# (config, tokenizer, processor configs, chat template, speakers) travels with the weights.
WEIGHT_FILES = ("model*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json", "*.ckpt")
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


class ExportError(CheckpointError):
    """An export or conversion that cannot be done as asked; nothing was written."""


def parse_size(size):
    """"5GB", "200KB", "512MiB" or a number of bytes -> bytes (decimal units, as Hugging Face)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", str(size).upper())
    if not match:
        raise ExportError(f"cannot read {size!r} as a size (examples: 5GB, 200KB)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def shard_plan(entries, max_bytes):
    """Consecutive entries grouped into shards of at most `max_bytes` (a larger tensor alone)."""
    shards, current, size = [], [], 0
    for entry in entries:
        n = tensor_nbytes(entry[1], entry[2])
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    return shards + ([current] if current else [])


def write_weights(folder, entries, max_shard_bytes, progress=None):
    """entries [(name, dtype, shape, fetch)] -> model.safetensors, or model-0000k-of-0000n.safetensors
    plus model.safetensors.index.json, as transformers' save_pretrained lays them out."""
    shards = shard_plan(entries, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for shard, filename in zip(shards, names):
        if progress is not None:
            shard = [(n, d, s, _counted(fetch, progress)) for n, d, s, fetch in shard]
        write_file(os.path.join(folder, filename), shard, metadata={"format": "pt"})
        weight_map.update({entry[0]: filename for entry in shard})
    if len(shards) > 1:
        total = sum(tensor_nbytes(e[1], e[2]) for e in entries)
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return names


def _counted(fetch, progress):
    def counted():
        value = fetch()
        progress.update(1)
        return value
    return counted


def copy_side_files(source, folder):
    """Copy every file of `source` that is not weights (tokenizer, processor, chat template, speakers)."""
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path) and not any(fnmatch.fnmatch(name, p) for p in WEIGHT_FILES) \
                and not os.path.exists(os.path.join(folder, name)):
            shutil.copy2(path, os.path.join(folder, name))


def write_config(folder, config_dict, dtype_name):
    # transformers 4.56+ reads `dtype`, older releases `torch_dtype`: both say the same
    config_dict = dict(config_dict, dtype=dtype_name, torch_dtype=dtype_name)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)


@contextlib.contextmanager
def building(out_dir, overwrite=False):
    """Yields a fresh hidden folder beside `out_dir`; when the block ends normally it becomes
    `out_dir` (replacing an existing one only with `overwrite`); on any error, or if the process is
    killed, `out_dir` is untouched (a killed run leaves only a hidden `.NAME.partial-*` folder)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ExportError(f"output {out_dir!r} already exists (pass --overwrite / overwrite=True to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(out_dir)}.partial-"
    for stale in os.listdir(parent):  # left by a killed run: its process is gone
        if stale.startswith(prefix) and not _alive(stale[len(prefix):].split("-")[0]):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    work = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    os.chmod(work, 0o755)
    if os.path.exists(out_dir):
        old = work + ".old"
        os.replace(out_dir, old)
        os.replace(work, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(work, out_dir)


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def saved_dtype(raw_config, source):
    """The dtype a checkpoint (`source`: keys() and dtype_name()) is saved in: its config's
    `dtype` (transformers 4.56 and newer write this) or `torch_dtype` (older), else that of its
    first floating tensor."""
    named = raw_config.get("dtype") or raw_config.get("torch_dtype")
    if named in SAFETENSORS_DTYPE:
        return named
    stored = {code: name for name, code in SAFETENSORS_DTYPE.items()}
    for name in source.keys():
        found = source.dtype_name(name)
        found = stored.get(found, found)
        if found in SAFETENSORS_DTYPE:
            return found
    return "float32"
