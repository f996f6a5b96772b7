"""Checkpoint conversion both ways, against the PyTorch reference and the real file formats:
Hugging Face -> ours -> Hugging Face is bit-identical, a LoRA-merged export loads in the
reference, .bin sources convert, bad sources and existing outputs are refused with nothing
written, memory stays near one shard, and a killed conversion leaves nothing that looks done."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import mindspore as ms
from mindone_ext import Qwen2_5OmniForConditionalGeneration
from mindone_ext.nn.lora import LoraConfig, apply_lora, lora_layers, merge_lora
from mindone_ext.utils.checkpoint import CheckpointFolder
from tests.conftest import ROOT, max_abs_diff

PT2MS = os.path.join(ROOT, "tools", "convert", "convert_pt2ms.py")
MS2PT = os.path.join(ROOT, "tools", "convert", "convert_ms2pt.py")
IDS = np.arange(5, 30).reshape(1, -1)


def convert(*args, check=True):
    done = subprocess.run([sys.executable, PT2MS, "--no_progress", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def reference_logits(path, ids=IDS):
    from transformers import Qwen2_5OmniForConditionalGeneration as Reference

    model = Reference.from_pretrained(path, dtype=torch.float32)
    # every tensor the reference holds came from the folder (none left at its random init)
    saved = set(CheckpointFolder(path).keys()) if os.path.isfile(os.path.join(path, "config.json")) and any(
        n.endswith(".safetensors") for n in os.listdir(path)) else None
    if saved is not None:
        assert set(model.state_dict()) == saved
    with torch.no_grad():
        return model.thinker(input_ids=torch.tensor(ids)).logits.numpy()


def tensors(path):
    folder = CheckpointFolder(path)
    return {name: folder.get(name) for name in folder.keys()}


def test_round_trip_is_bit_identical_and_the_reference_agrees(tiny_checkpoint, tmp_path):
    convert("--src", tiny_checkpoint, "--out", tmp_path / "ms", "--max_shard_size", "1MB")
    ours = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(tmp_path / "ms"))
    ours.save_pretrained(str(tmp_path / "hf"), max_shard_size="1MB")
    before, after = tensors(tiny_checkpoint), tensors(str(tmp_path / "hf"))
    assert sorted(before) == sorted(after)
    assert all(before[k].dtype == np.float32 and np.array_equal(before[k].view(np.uint32), after[k].view(np.uint32))
               for k in before)
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 1  # sharded, with index
    for name in ("tokenizer.json", "chat_template.json", "preprocessor_config.json", "spk_dict.pt",
                 "generation_config.json"):
        assert os.path.isfile(tmp_path / "hf" / name)
    np.testing.assert_array_equal(reference_logits(str(tmp_path / "hf")), reference_logits(tiny_checkpoint))


def test_lora_merged_export_loads_in_the_reference(tiny_checkpoint, tmp_path):
    # loaded without audio output: the talker and token2wav weights are taken from the source folder
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False)
    apply_lora(model.thinker, LoraConfig(r=4, lora_alpha=8))
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(model.thinker):
        layer.lora_B.weight.set_data(ms.Tensor(rng.normal(0, 0.05, layer.lora_B.weight.shape).astype(np.float32)))
    adapted = model.thinker(input_ids=IDS).logits.asnumpy()
    assert max_abs_diff(adapted, reference_logits(tiny_checkpoint)) > 1e-2  # the adapter matters
    with pytest.raises(ValueError, match="unmerged LoRA adapters"):
        model.save_pretrained(str(tmp_path / "unmerged"))
    assert not os.path.exists(tmp_path / "unmerged")
    merge_lora(model.thinker)
    model.save_pretrained(str(tmp_path / "merged"))
    assert max_abs_diff(reference_logits(str(tmp_path / "merged")), adapted) <= 1e-4


def test_adapter_folder_merged_by_the_command_line_tool(tiny_checkpoint, tmp_path):
    from mindone_ext.nn.lora import save_adapter

    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint).thinker
    apply_lora(thinker, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for _, layer in lora_layers(thinker):
        layer.lora_B.weight.set_data(ms.Tensor(np.full(layer.lora_B.weight.shape, 0.03, np.float32)))
    save_adapter(thinker, str(tmp_path / "adapter"))
    adapted = thinker(input_ids=IDS).logits.asnumpy()
    done = subprocess.run([sys.executable, MS2PT, "--src", tiny_checkpoint, "--adapter_path", tmp_path / "adapter",
                           "--out", tmp_path / "out"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_abs_diff(reference_logits(str(tmp_path / "out")), adapted) <= 1e-4


def test_pytorch_bin_checkpoint_converts(tmp_path):
    from tools.tiny_checkpoint import build

    source = build(str(tmp_path / "bin"), seed=2, shard_size="300KB", safe_serialization=False)
    assert os.path.isfile(os.path.join(source, "pytorch_model.bin.index.json"))
    convert("--src", source, "--out", tmp_path / "ms", "--dtype", "bfloat16")
    assert json.load(open(tmp_path / "ms" / "config.json"))["torch_dtype"] == "bfloat16"
    ours = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(tmp_path / "ms"), mindspore_dtype=ms.bfloat16)
    want = reference_logits(source)
    assert max_abs_diff(ours.thinker(input_ids=IDS).logits.asnumpy(), want) <= 0.03 * np.abs(want).max()


def test_bad_sources_and_existing_outputs_are_refused(tiny_checkpoint, tmp_path):
    def refused(source, out, *extra, match):
        done = convert("--src", source, "--out", out, *extra, check=False)
        assert done.returncode != 0 and match in done.stderr, done.stderr[-2000:]
        assert not os.path.exists(out) or out == tmp_path / "exists"
        assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]

    refused(tmp_path / "nowhere", tmp_path / "o1", match="does not exist")
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    config = json.load(open(other / "config.json"))
    json.dump(dict(config, model_type="llama"), open(other / "config.json", "w"))
    refused(other, tmp_path / "o2", match="expected 'qwen2_5_omni'")

    missing = tmp_path / "missing"
    shutil.copytree(tiny_checkpoint, missing)
    os.remove(missing / sorted(n for n in os.listdir(missing) if n.startswith("model-"))[1])
    refused(missing, tmp_path / "o3", match="missing")

    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_checkpoint, wrong)
    from mindone_ext.utils.safetensors_io import SafetensorsFile, save_file

    index = json.load(open(wrong / "model.safetensors.index.json"))
    shard = index["weight_map"]["thinker.model.norm.weight"]
    content = {k: SafetensorsFile(str(wrong / shard)).get(k) for k in SafetensorsFile(str(wrong / shard)).keys()}
    content["thinker.model.norm.weight"] = np.ones(7, np.float32)
    save_file(content, str(wrong / shard))
    refused(wrong, tmp_path / "o4", match="thinker.model.norm.weight (checkpoint [7]")

    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    refused(tiny_checkpoint, tmp_path / "exists", match="already exists")
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    convert("--src", tiny_checkpoint, "--out", tmp_path / "exists", "--overwrite")
    assert not (tmp_path / "exists" / "keep.txt").exists()


def test_the_default_dtype_is_the_sources_and_a_truncated_shard_is_one_line(tmp_path):
    """transformers 4.57 writes `dtype` (not `torch_dtype`) in config.json; without --dtype a
    bfloat16 source stays bfloat16, also when its config names no dtype (its tensors say)."""
    from tools.tiny_checkpoint import build
    from mindone_ext.utils.safetensors_io import SafetensorsFile

    source = build(str(tmp_path / "bf16"), seed=4, shard_size="1GB", dtype="bfloat16")
    config = json.load(open(os.path.join(source, "config.json")))
    assert config.get("dtype") == "bfloat16" and "torch_dtype" not in config
    nameless = tmp_path / "nameless"
    shutil.copytree(source, nameless)
    json.dump({k: v for k, v in config.items() if k != "dtype"}, open(nameless / "config.json", "w"))
    for src, out in ((source, tmp_path / "out"), (nameless, tmp_path / "out_nameless")):
        convert("--src", src, "--out", out)
        written = json.load(open(out / "config.json"))
        assert written["dtype"] == written["torch_dtype"] == "bfloat16"
        stored = {SafetensorsFile(str(out / f)).dtype_name(k) for f in os.listdir(out) if f.endswith(".safetensors")
                  for k in SafetensorsFile(str(out / f)).keys()}
        assert "F32" not in stored and "BF16" in stored

    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(truncated / "model.safetensors") // 2)
    done = convert("--src", truncated, "--out", tmp_path / "o5", check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: ") and "truncated" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "o5").exists()


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """About 40 MB of float32 in 5 MB shards: a larger vocabulary and more, wider decoder layers."""
    from tools.tiny_checkpoint import build

    return build(str(tmp_path_factory.mktemp("big") / "ckpt"), seed=3, shard_size="5MB",
                 text_overrides=dict(vocab_size=8000, num_hidden_layers=28, intermediate_size=1024))


def max_rss_mb(*args):
    """Peak resident memory (MB) of the converter run in its own process."""
    code = ("import resource, runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], "
            "run_name='__main__')\nfinally:\n    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code, PT2MS, "--no_progress", *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split("MAXRSS")[-1]) / 1024


def test_peak_memory_stays_near_one_shard(sharded_checkpoint, tmp_path):
    sizes = [os.path.getsize(os.path.join(sharded_checkpoint, n)) for n in os.listdir(sharded_checkpoint)
             if n.endswith(".safetensors")]
    total, largest = sum(sizes) / 2 ** 20, max(sizes) / 2 ** 20
    assert len(sizes) >= 6 and total > 30
    # The fixed overhead (Python, MindSpore, the model skeleton the source is checked against) is
    # what checking the same checkpoint costs; converting it may add at most 1.5 x its largest shard.
    overhead = max_rss_mb("--src", sharded_checkpoint, "--check_only")
    peak = max_rss_mb("--src", sharded_checkpoint, "--out", tmp_path / "large", "--max_shard_size", "5MB")
    assert peak <= overhead + 1.5 * largest, (peak, overhead, largest, total)


def test_a_killed_conversion_leaves_no_complete_looking_folder(sharded_checkpoint, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, PT2MS, "--no_progress", "--src", sharded_checkpoint, "--out", out,
                                "--max_shard_size", "1MB"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        partial = [n for n in os.listdir(tmp_path) if n.startswith(".out.partial-")]
        if partial and any(n.endswith(".safetensors") for n in os.listdir(tmp_path / partial[0])):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the conversion finished before it could be interrupted"
    assert not out.exists()
    convert("--src", sharded_checkpoint, "--out", out, "--max_shard_size", "1MB")  # the next run cleans up
    assert out.exists() and not [n for n in os.listdir(tmp_path) if ".partial-" in n]
