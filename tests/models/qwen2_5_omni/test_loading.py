"""The loader reads the Hugging Face folder as it is, and says clearly what is wrong with one
that cannot be loaded."""
import json
import os
import re
import shutil
import struct

import numpy as np
import pytest
import torch
import mindspore as ms
from safetensors.torch import load_file, save_file

from mindone_ext import Qwen2_5OmniForConditionalGeneration
from mindone_ext.nn.device import on_ascend
from mindone_ext.utils.checkpoint import CheckpointError

from tests.conftest import max_abs_diff

THINKER_WEIGHT = "thinker.model.layers.1.mlp.up_proj.weight"


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def edit_tensor(folder, name, change):
    """Rewrite the shard holding `name` with `change(tensors)` applied."""
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shard = index["weight_map"][name]
    tensors = load_file(os.path.join(folder, shard))
    change(tensors)
    save_file(tensors, os.path.join(folder, shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


def test_sharded_checkpoint_loads_every_thinker_tensor_unchanged(tiny_checkpoint, our_model):
    ours = dict(our_model.parameters_and_names())
    assert THINKER_WEIGHT in ours and "thinker.lm_head.weight" in ours
    from safetensors import safe_open
    with open(os.path.join(tiny_checkpoint, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1, "the fixture must exercise the sharded index"
    for name, param in ours.items():
        with safe_open(os.path.join(tiny_checkpoint, weight_map[name]), "pt") as f:
            np.testing.assert_array_equal(param.asnumpy(), f.get_tensor(name).numpy())


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "missing")
    edit_tensor(folder, THINKER_WEIGHT, lambda t: t.pop(THINKER_WEIGHT))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): " + THINKER_WEIGHT.replace(".", r"\.")):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(folder)


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "shape")
    edit_tensor(folder, THINKER_WEIGHT, lambda t: t.__setitem__(THINKER_WEIGHT, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"wrong shape.*up_proj\.weight \(checkpoint \[3, 3\], model \[128, 64\]\)"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(folder)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "extra")
    edit_tensor(folder, THINKER_WEIGHT, lambda t: t.__setitem__("thinker.model.bogus.weight", torch.zeros(2)))
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    index["weight_map"]["thinker.model.bogus.weight"] = index["weight_map"][THINKER_WEIGHT]
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): thinker\.model\.bogus\.weight"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(folder)


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "shard")
    os.remove(os.path.join(folder, "model-00002-of-00024.safetensors"))
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00024.safetensors"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(folder)


def test_empty_folder_and_folder_without_weights(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="has no config.json"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(str(tmp_path / "nowhere"))
    shutil.copy(os.path.join(tiny_checkpoint, "config.json"), tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(str(tmp_path))


def test_config_of_another_model_is_refused(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "other")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["model_type"] = "llama"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(folder)


def test_speech_weights_are_not_read_without_audio_output(tiny_checkpoint, tmp_path):
    """With enable_audio_output=False the talker/token2wav shards may even be unreadable."""
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "nospeech")
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    thinker_shards = {v for k, v in weight_map.items() if k.startswith("thinker.")}
    speech_only = {v for k, v in weight_map.items() if k.startswith(("talker.", "token2wav."))} - thinker_shards
    assert speech_only
    for shard in speech_only:
        with open(os.path.join(folder, shard), "wb") as f:
            f.write(b"garbage")
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(folder, enable_audio_output=False)
    assert not model.has_talker
    assert not any(n.startswith(("talker.", "token2wav.")) for n, _ in model.parameters_and_names())


def test_tied_embeddings_single_file(tiny_tied_checkpoint):
    assert os.path.exists(os.path.join(tiny_tied_checkpoint, "model.safetensors"))
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_tied_checkpoint)
    thinker = model.thinker
    assert thinker.lm_head.weight is thinker.model.embed_tokens.weight
    from transformers import Qwen2_5OmniForConditionalGeneration as Reference
    reference = Reference.from_pretrained(tiny_tied_checkpoint, dtype=torch.float32).eval()
    ids = np.arange(3, 20).reshape(1, -1)
    with torch.no_grad():
        want = reference.thinker(input_ids=torch.tensor(ids)).logits.numpy()
    assert max_abs_diff(thinker(input_ids=ids).logits.asnumpy(), want) <= 1e-4


@pytest.mark.parametrize("dtype, tolerance", [(ms.float16, 0.01), (ms.bfloat16, 0.03)])
def test_half_precision_loads_stay_close_to_float32(tiny_checkpoint, our_model, padded_batch, dtype, tolerance):
    """Tolerance relative to the largest logit: fp16 rounds weights and activations (~1e-3
    per op), bf16 rounds weights to 8 bits of mantissa (kept and computed in float32 on CPU,
    which has no bf16 matmul; kept in bf16 on Ascend)."""
    ids, mask = padded_batch
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, mindspore_dtype=dtype)
    kept = ms.float32 if dtype == ms.bfloat16 and not on_ascend() else dtype
    assert model.thinker.lm_head.weight.dtype == kept
    half = model.thinker(input_ids=ids, attention_mask=mask).logits.asnumpy().astype(np.float32)
    full = our_model.thinker(input_ids=ids, attention_mask=mask).logits.asnumpy()
    valid = mask.astype(bool)
    assert np.isfinite(half).all()
    scale = np.abs(full[valid]).max()
    assert max_abs_diff(half[valid], full[valid]) <= tolerance * scale
    out = model.generate(return_audio=False, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert out.shape == (2, ids.shape[1] + 4)


def test_unsupported_dtype_and_attention_are_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="mindspore_dtype"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, mindspore_dtype=ms.int8)
    with pytest.raises(ValueError, match="attn_implementation"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="xformers")


def edit_json(folder, filename, change):
    path = os.path.join(folder, filename)
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("section, field, value, words", [
    ("text_config", "vocab_size", 10 ** 12, "thinker_config.text_config.vocab_size = 1000000000000"),
    ("text_config", "num_attention_heads", 0, "num_attention_heads = 0"),
    ("audio_config", "max_source_positions", 10 ** 9, "max_source_positions"),
    ("text_config", "hidden_size", "64", "hidden_size = '64'"),
    ("text_config", "num_key_value_heads", 3, "not a multiple of 3 key/value heads"),
])
def test_absurd_config_sizes_are_refused_before_anything_is_built(tiny_checkpoint, tmp_path, section, field, value,
                                                                  words):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "absurd")
    edit_json(folder, "config.json", lambda c: c["thinker_config"][section].update({field: value}))
    with pytest.raises(CheckpointError, match=re.escape(words)):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(folder)


def test_malformed_checkpoint_files_are_named(tiny_checkpoint, tmp_path):
    cases = {
        "index not an object": lambda f: edit_json(f, "model.safetensors.index.json",
                                                   lambda i: i.update(weight_map=[1, 2])),
        "index entry not a name": lambda f: edit_json(f, "model.safetensors.index.json",
                                                      lambda i: i["weight_map"].update({THINKER_WEIGHT: 7})),
        "config not JSON": lambda f: open(os.path.join(f, "config.json"), "w").write("{oops"),
        "config a list": lambda f: open(os.path.join(f, "config.json"), "w").write("[1]"),
        "generation config nested": lambda f: open(os.path.join(f, "generation_config.json"), "w").write(
            "[" * 100000 + "]" * 100000),
    }
    for name, damage in cases.items():
        folder = copy_checkpoint(tiny_checkpoint, tmp_path / name.replace(" ", "_"))
        damage(folder)
        with pytest.raises(CheckpointError):
            Qwen2_5OmniForConditionalGeneration.from_pretrained(folder)
    # a shard whose header entries are not what they claim
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "header")
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shard = os.path.join(folder, json.load(f)["weight_map"][THINKER_WEIGHT])
    header = json.dumps({"x": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}}).encode()
    with open(shard, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ValueError, match="corrupt safetensors header: tensor x"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(folder)


def test_files_outside_the_checkpoint_folder_are_not_followed(tiny_checkpoint, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "escape")
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shard = index["weight_map"][THINKER_WEIGHT]
    shutil.move(os.path.join(folder, shard), outside)
    index["weight_map"] = {k: ("../elsewhere.safetensors" if v == shard else v) for k, v in index["weight_map"].items()}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match="points outside the checkpoint folder"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(folder)
    # the same through a symlink named like a shard
    index["weight_map"] = {k: (shard if v == "../elsewhere.safetensors" else v) for k, v in index["weight_map"].items()}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    os.symlink(outside, os.path.join(folder, shard))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        Qwen2_5OmniForConditionalGeneration.from_pretrained(folder)


def test_a_hub_cache_snapshot_of_symlinks_into_blobs_loads(tiny_checkpoint, tmp_path):
    """The Hugging Face cache's layout: snapshots/<revision>/<file> -> ../../blobs/<hash>."""
    repo = tmp_path / "models--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, name in enumerate(sorted(os.listdir(tiny_checkpoint))):
        shutil.copy(os.path.join(tiny_checkpoint, name), blobs / f"blob{i}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snapshot / name)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(snapshot), enable_audio_output=False)
    assert model.thinker.lm_head.weight.shape[0] > 0


def test_loading_and_compiling_show_progress_on_a_terminal_and_nothing_in_a_pipe(tiny_checkpoint):
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios
    import threading

    from tests.conftest import ROOT

    code = ("from mindone_ext import Qwen2_5OmniForConditionalGeneration as M\n"
            f"m = M.from_pretrained({tiny_checkpoint!r})\n"
            "m.generate(input_ids=[[1, 2, 3]], max_new_tokens=3, eos_token_id=[], talker_max_new_tokens=4)\n"
            "print('loaded')")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a terminal 80 wide
    seen = []

    def read_terminal():  # read as it is written: a pty's buffer is small, and gone once closed
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the other end closed
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=follower, timeout=300, cwd=ROOT)
    os.close(follower)
    reader.join(10)
    os.close(leader)
    seen = b"".join(seen)
    assert done.returncode == 0 and done.stdout.strip() == b"loaded"
    assert b"loading tiny" in seen and b"tensor" in seen, seen[-500:]
    # the first prompt and the first decode step each compile a graph, and say so while they do
    assert b"compiling the Thinker for 32 token(s) x 256 cache slots" in seen, seen[-500:]
    assert b"compiling the Thinker for 1 token(s) x 256 cache slots" in seen, seen[-500:]
    assert b"compiling the Talker for 1 token(s)" in seen and b"compiling the DiT for" in seen, seen[-500:]
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300, cwd=ROOT)
    assert piped.returncode == 0 and b"loading tiny" not in piped.stderr and b"compiling" not in piped.stderr
