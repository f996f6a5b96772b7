"""Convert a Hugging Face Qwen2.5-Omni folder into the checkpoint folder mindone_ext loads.

    python tools/convert/convert_pt2ms.py --src /models/Qwen2.5-Omni-7B --out /models/Qwen2.5-Omni-7B-ms \
        [--dtype bfloat16] [--max_shard_size 5GB] [--overwrite]

The source holds safetensors (one file or shards with their index) or PyTorch `.bin` files (read
with `torch.load(weights_only=True, mmap=True)`: no pickled code runs). The output is the layout
`Qwen2_5OmniForConditionalGeneration.from_pretrained` reads: safetensors shards under the same
tensor names (the port's parameter names are the reference's), config.json, and every tokenizer,
processor and speaker file copied. It is checked against the model the config describes before
anything is written (missing, unexpected or mis-shaped tensors are refused, listed), streamed one
tensor at a time (memory stays near one tensor, whatever the model's size), and built in a hidden
folder renamed into place at the end: an interrupted run leaves no folder that looks complete.
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from mindone_ext.utils.checkpoint import CheckpointError, CheckpointFolder  # noqa: E402
from mindone_ext.utils.export import (SAFETENSORS_DTYPE, building, copy_side_files, parse_size,  # noqa: E402
                                      saved_dtype, write_config, write_weights)
from mindone_ext.utils.safetensors_io import SafetensorsError  # noqa: E402

BIN_INDEX = "pytorch_model.bin.index.json"


class BinFiles:
    """PyTorch .bin shards, read one file at a time (the file in use is memory-mapped)."""

    def __init__(self, path):
        index = os.path.join(path, BIN_INDEX)
        listed = None  # the index's name -> shard map, if there is an index
        if os.path.isfile(index):
            with open(index) as f:
                listed = json.load(f)["weight_map"]
            missing = sorted({s for s in listed.values() if not os.path.isfile(os.path.join(path, s))})
            if missing:
                raise CheckpointError(f"{path!r}: {BIN_INDEX} lists shard(s) that are missing: {', '.join(missing)}")
            shards = sorted(set(listed.values()))
        else:  # every .bin file is a shard
            shards = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.bin")))
        found, self.shapes = {}, {}
        for shard in shards:  # each file read once, for the names and shapes
            for name, tensor in self._load(os.path.join(path, shard)).items():
                if listed is None or listed.get(name) == shard:
                    found[name], self.shapes[name] = shard, tuple(tensor.shape)
        self.weight_map = listed if listed is not None else found
        self.path, self._open = path, (None, None)

    @staticmethod
    def _load(file):
        import torch

        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a pickle that is not plain tensors, or a corrupt file
            raise CheckpointError(f"{file}: cannot be read as a PyTorch state dict ({type(e).__name__}: {e})") from None

    def _state(self, name):
        shard = self.weight_map[name]
        if self._open[0] != shard:
            self._open = (shard, self._load(os.path.join(self.path, shard)))
        return self._open[1]

    def keys(self):
        return self.weight_map.keys()

    def shape(self, name):
        if name not in self.shapes:
            raise CheckpointError(f"{self.path!r}: tensor {name} is listed in the index but not in its shard")
        return self.shapes[name]

    def get(self, name):
        tensor = self._state(name)[name]
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()

    def dtype_name(self, name):
        return str(self._state(name)[name].dtype).removeprefix("torch.")


def open_source(path):
    if not os.path.isdir(path):
        raise CheckpointError(f"source {path!r} does not exist or is not a folder")
    has_bin = os.path.isfile(os.path.join(path, BIN_INDEX)) or glob.glob(os.path.join(path, "*.bin"))
    has_safetensors = glob.glob(os.path.join(path, "*.safetensors"))
    if has_bin and not any(os.path.basename(f).startswith("model") for f in has_safetensors):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path!r} has no config.json: not a Hugging Face checkpoint folder")
        return BinFiles(path)
    return CheckpointFolder(path)


def expected_tensors(config_path):
    """{name: shape} of every parameter the config's model has (built without allocating weights)."""
    from mindone_ext import Qwen2_5OmniForConditionalGeneration
    from mindone_ext.models.qwen2_5_omni.config import load_config

    config = load_config(_ConfigOnly(config_path))
    model = Qwen2_5OmniForConditionalGeneration(config, enable_audio_output=True)
    return {name: tuple(p.shape) for name, p in model.stored_parameters()}


class _ConfigOnly:
    """What load_config reads of a checkpoint folder, without requiring its weights."""

    def __init__(self, config_path):
        self.config_path = config_path

    def read_json(self, name):
        with open(os.path.join(os.path.dirname(self.config_path), name)) as f:
            return json.load(f)


def check(source, expected):
    have = set(source.keys())
    missing = sorted(set(expected) - have)
    unexpected = sorted(have - set(expected))
    wrong = [f"{n} (checkpoint {list(source.shape(n))}, model {list(expected[n])})"
             for n in sorted(have & set(expected)) if tuple(source.shape(n)) != expected[n]]
    problems = [f"{title} ({len(names)}): {', '.join(names[:10])}" for title, names in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)) if names]
    if problems:
        raise CheckpointError(f"{source.path!r} is not a complete Qwen2.5-Omni checkpoint:\n  " + "\n  ".join(problems))


def convert(src, out, dtype=None, max_shard_size="5GB", overwrite=False, progress=True, check_only=False):
    source = open_source(src)
    expected = expected_tensors(os.path.join(src, "config.json"))
    check(source, expected)
    if check_only:
        return None
    with open(os.path.join(src, "config.json")) as f:
        raw_config = json.load(f)
    dtype = dtype or saved_dtype(raw_config, source)
    # tensors grouped by the file they come from: each source file is read once, in order
    names = sorted(source.keys(), key=lambda n: (source.weight_map.get(n, ""), n))
    entries = [(name, SAFETENSORS_DTYPE[dtype], source.shape(name), lambda n=name: source.get(n)) for name in names]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(entries), unit="tensor", desc="converting")
    with building(out, overwrite) as work:
        write_weights(work, entries, parse_size(max_shard_size), bar)
        write_config(work, raw_config, dtype)
        copy_side_files(src, work)
    if bar is not None:
        bar.close()
    return os.path.abspath(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="a Hugging Face Qwen2.5-Omni folder (safetensors or .bin)")
    ap.add_argument("--out", help="the folder to write (must not exist unless --overwrite)")
    ap.add_argument("--check_only", action="store_true", help="check the source against its config, write nothing")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="cast floating tensors (default: the dtype the source is saved in)")
    ap.add_argument("--max_shard_size", default="5GB")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args()
    if not (args.out or args.check_only):
        ap.error("--out is required (or --check_only)")
    try:
        path = convert(args.src, args.out, args.dtype, args.max_shard_size, args.overwrite, not args.no_progress,
                       args.check_only)
    except (CheckpointError, SafetensorsError) as e:  # ExportError is a CheckpointError
        raise SystemExit(f"error: {e}") from None
    print(f"{args.src}: a complete Qwen2.5-Omni checkpoint" if args.check_only else f"wrote {path}")


if __name__ == "__main__":
    main()
