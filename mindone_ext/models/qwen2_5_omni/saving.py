"""`save_pretrained`: the model's weights as a Hugging Face folder that the PyTorch reference (and
anything else that reads the official release) loads: the reference's tensor names, sharded
safetensors with their index, config.json, and the tokenizer, processor and speaker files of the
folder the model came from."""
import json
import os

import numpy as np
import mindspore as ms

from ...nn.lora import lora_layers
from ...utils.checkpoint import CheckpointFolder
from ...utils.export import (SAFETENSORS_DTYPE, ExportError, building, copy_side_files, parse_size, write_config,
                             write_weights)
from .model import SPEECH_PREFIXES

DTYPE_NAMES = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}


def save_pretrained(model, out_dir, dtype=None, max_shard_size="5GB", overwrite=False, source=None):
    """Write `model` to `out_dir`. `dtype` ("float32", "float16", "bfloat16") defaults to the dtype the
    model was loaded in. Tensors the model does not hold (the talker and token2wav of a model loaded
    with enable_audio_output=False) and the non-weight files come from `source`, by default the
    folder the model was loaded from. Adapters must be merged first (or saved with save_adapter)."""
    if lora_layers(model):
        raise ExportError("the model has unmerged LoRA adapters: merge_lora(model.thinker) before save_pretrained "
                          "(or keep them separate with save_adapter)")
    dtype = dtype or DTYPE_NAMES[model.dtype]
    if dtype not in DTYPE_NAMES.values():
        raise ExportError(f"dtype must be one of {sorted(DTYPE_NAMES.values())}, got {dtype!r}")
    source = source or getattr(model, "name_or_path", None)
    folder = CheckpointFolder(source) if source else None

    entries = []
    for name, param in model.stored_parameters():
        entries.append((name, SAFETENSORS_DTYPE[dtype], tuple(param.shape),
                        lambda p=param: p.asnumpy().astype(np.float32)))
    if not model.has_talker:
        if folder is None:
            raise ExportError("the model was loaded without audio output and has no source folder to take the "
                              "talker and token2wav weights from: pass source=")
        for name in sorted(k for k in folder.keys() if k.startswith(SPEECH_PREFIXES)):
            entries.append((name, SAFETENSORS_DTYPE[dtype], folder.shape(name),
                            lambda n=name: folder.get(n).astype(np.float32)))

    with building(out_dir, overwrite) as work:
        write_weights(work, entries, parse_size(max_shard_size))
        raw = folder.read_json("config.json") if folder else model.config.to_dict()
        write_config(work, raw, dtype)
        if model.generation_defaults and not (folder and folder.read_json("generation_config.json")):
            with open(os.path.join(work, "generation_config.json"), "w") as f:
                json.dump(model.generation_defaults, f, indent=2)
        if folder:
            copy_side_files(folder.path, work)
    return os.path.abspath(out_dir)
