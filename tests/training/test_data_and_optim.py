"""Fine-tuning data (file formats, bad rows, labels) and the optimizer side (AdamW, schedule,
clipping) against their PyTorch / transformers definitions."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import mindspore as ms
from mindone_ext import Qwen2_5OmniProcessor
from mindone_ext.training import (AdamW, Collator, ConversationDataset, DatasetError, assistant_labels,
                                  clip_by_global_norm, cosine_with_warmup)
from tests.conftest import SHIPPED_CHECKPOINT
from tests.hostile_media import png_declaring

sys.path.insert(0, os.path.join(os.path.dirname(SHIPPED_CHECKPOINT)))
from demo_media import write_image, write_ocr_dataset, write_wav, speech_like  # noqa: E402


@pytest.fixture(scope="module")
def processor():
    return Qwen2_5OmniProcessor.from_pretrained(SHIPPED_CHECKPOINT)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def test_bad_rows_are_skipped_and_counted(tmp_path):
    write_image(str(tmp_path / "ok.png"), 56, 56)
    write_wav(str(tmp_path / "ok.wav"), speech_like(0.5, 16000), 16000)
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"image": "ok.png", "text": "x + 1"},
        "{not json",
        {"image": "missing.png", "text": "x"},
        {"image": "ok.png", "text": "  "},
        {"audio": "ok.wav", "transcript": "hello"},
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "ok.wav"}]},
                      {"role": "assistant", "content": "an answer"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        [1, 2],
    ])
    data = ConversationDataset(path, prompt="Read it.")
    assert len(data) == 3
    assert dict(data.skipped) == {"malformed JSON": 1, "missing image file": 1, "empty answer": 1,
                                  "no assistant message": 1, "row is not a JSON object": 1}
    first = data[0]
    assert first[0]["content"][0] == {"type": "image", "image": str(tmp_path / "ok.png")}
    assert first[0]["content"][1] == {"type": "text", "text": "Read it."}
    assert first[1] == {"role": "assistant", "content": "x + 1"}


def test_hostile_rows_are_skipped_and_counted_too(tmp_path, processor):
    write_image(str(tmp_path / "ok.png"), 56, 56)
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_declaring(20000, 20000))  # 20000 x 20000 declared in a few bytes
    ok = {"image": "ok.png", "text": "x + 1"}
    path = write_jsonl(tmp_path / "train.jsonl", [
        ok,
        {"messages": [{"role": "user", "content": [5]}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": ["a bare string is text"]}, {"role": "assistant", "content": "b"}]},
        {"image": "ok.png", "text": "x <|IMAGE|> y"},
        {"messages": [{"role": "user", "content": "<|im_start|>system"}, {"role": "assistant", "content": "c"}]},
        {"image": "http://example.com/a.png", "text": "remote"},
        {"image": "huge.png", "text": "bomb"},
    ])
    with open(path, "ab") as f:
        f.write(b'{"image": "ok.png", "text": "\xff\xfe"}\n')  # not UTF-8
    data = ConversationDataset(path, prompt="Read it.")
    assert dict(data.skipped) == {"malformed content item": 1, "text holds a special token": 2,
                                  "remote image (fetching is off: allow_remote / --allow_remote_media)": 1,
                                  "not UTF-8": 1}
    assert len(data) == 3 and data[1][0]["content"] == [{"type": "text", "text": "a bare string is text"}]
    collate = Collator(processor)
    batch = collate(list(data))
    assert batch["input_ids"].shape[0] == 2 and collate.skipped == {"media does not decode or is too large": 1}
    assert len(ConversationDataset(path, prompt="Read it.", allow_remote=True)) == 4  # fetched only when asked


def test_resume_passes_over_a_damaged_checkpoint(tmp_path, monkeypatch):
    from mindone_ext import Qwen2_5OmniForConditionalGeneration
    from mindone_ext.nn.lora import LoraConfig, apply_lora
    from mindone_ext.training import resume_latest, save_checkpoint

    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(SHIPPED_CHECKPOINT, enable_audio_output=False).thinker
    apply_lora(thinker, LoraConfig(r=2, lora_alpha=4))
    optimizer = AdamW(thinker.trainable_params(), lr=1e-3)
    for step in (1, 2):
        save_checkpoint(str(tmp_path), thinker, optimizer, {"global_step": step, "log_history": []})

    def ctrl_c():
        raise KeyboardInterrupt

    monkeypatch.setattr(optimizer, "state_dict", ctrl_c)  # after the adapter is written, before the moments
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), thinker, optimizer, {"global_step": 3, "log_history": []})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2"]  # nothing half-written left
    monkeypatch.undo()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_hi')  # cut short
    path, state = resume_latest(str(tmp_path), thinker, optimizer)
    assert path.endswith("checkpoint-1") and state["global_step"] == 1
    (tmp_path / "checkpoint-1" / "optimizer.safetensors").write_bytes(b"\x00" * 4)
    assert resume_latest(str(tmp_path), thinker, optimizer) == (None, None)


def test_missing_or_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ConversationDataset(str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="no data files"):
        ConversationDataset(str(tmp_path))
    path = write_jsonl(tmp_path / "bad.jsonl", ["{", {"image": "gone.png", "text": "x"}])
    with pytest.raises(DatasetError, match="no usable rows"):
        ConversationDataset(path)


def test_huggingface_datasets_parquet_and_save_to_disk(tmp_path):
    """The formats `datasets` writes: an Image feature stores {"bytes", "path"} structs."""
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (40, 30), (i * 40, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["a", "b", ""]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    os.makedirs(tmp_path / "repo" / "data")
    ds.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "repo", tmp_path / "saved"):
        data = ConversationDataset(str(path), prompt="Formula?")
        assert len(data) == 2 and data.skipped == {"empty answer": 1}
        image = data[1][0]["content"][0]["image"]
        assert isinstance(image, bytes) and data[1][1]["content"] == "b"


def test_labels_cover_only_the_assistant_answers(processor, tmp_path):
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"},
                    {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "six"}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=False)
    ids = processor(text)["input_ids"]
    labels = assistant_labels(ids, processor.tokenizer)
    learned = processor.tokenizer.decode(ids[labels != -100])
    assert learned == "four<|im_end|>six<|im_end|>"


def test_collator_pads_batches_and_masks_prompt_media_and_padding(processor, tmp_path):
    folder = tmp_path / "ocr"
    data = ConversationDataset(write_ocr_dataset(str(folder), n=3), prompt="Formula?")
    os.remove(folder / "images" / "1.png")  # disappears after indexing: dropped at batch time, counted
    collate = Collator(processor)
    batch = collate([data[0], data[1], data[2]])
    assert collate.skipped == {"media does not decode or is too large": 1}
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[0] == 2 and batch["image_grid_thw"].shape == (2, 3)
    assert (labels[mask == 0] == -100).all()
    image_token = processor.tokenizer.convert_tokens_to_ids("<|IMAGE|>")
    assert (labels[ids == image_token] == -100).all()
    for row, formula in zip(range(2), [data[0][1]["content"], data[2][1]["content"]]):
        assert processor.tokenizer.decode(ids[row][labels[row] != -100]) == formula + "<|im_end|>"
    assert Collator(processor, max_length=10)([data[0]]) is None


def test_adamw_matches_torch():
    """Parameters of one shape are updated together (stacked): several shapes, interleaved, and the
    moments saved and loaded into a new optimizer halfway."""
    rng = np.random.default_rng(0)
    start = [rng.normal(size=shape).astype(np.float32) for shape in ((3, 5), (4,), (3, 5), (3, 5), (4,), (2, 2, 2))]
    grads = [[rng.normal(size=w.shape).astype(np.float32) for w in start] for _ in range(4)]
    params = [ms.Parameter(ms.Tensor(w), name=f"w{i}") for i, w in enumerate(start)]
    ours = AdamW(params, lr=0.01, weight_decay=0.1)
    tensors = [torch.tensor(w, requires_grad=True) for w in start]
    theirs = torch.optim.AdamW(tensors, lr=0.01, weight_decay=0.1)
    for step, g in enumerate(grads):
        if step == 2:
            resumed = AdamW(params, lr=0.01, weight_decay=0.1)
            resumed.load_state_dict(*ours.state_dict())
            ours = resumed
        lr = 0.01 * cosine_with_warmup(step, 1, 4)
        ours.step(tuple(ms.Tensor(x) for x in g), lr)
        for group in theirs.param_groups:
            group["lr"] = lr
        for t, x in zip(tensors, g):
            t.grad = torch.tensor(x)
        theirs.step()
    for p, t in zip(params, tensors):
        np.testing.assert_allclose(p.asnumpy(), t.detach().numpy(), atol=1e-6)
    state, _ = ours.state_dict()
    for i, t in enumerate(tensors):
        np.testing.assert_allclose(state[f"exp_avg_sq.w{i}"], theirs.state[t]["exp_avg_sq"].numpy(), rtol=1e-4)


def test_schedule_and_clipping_match_transformers_and_torch():
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=10)
    want = []
    for _ in range(10):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    np.testing.assert_allclose([cosine_with_warmup(s, 3, 10) for s in range(10)], want, atol=1e-12)

    rng = np.random.default_rng(1)
    grads = [rng.normal(size=(6, 2)).astype(np.float32) * 3, rng.normal(size=(5,)).astype(np.float32)]
    tensors = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for t, g in zip(tensors, grads):
        t.grad = torch.tensor(g)
    norm = torch.nn.utils.clip_grad_norm_(tensors, 1.0).item()
    clipped, ours = clip_by_global_norm(tuple(ms.Tensor(g) for g in grads), 1.0)
    assert abs(ours - norm) <= 1e-4
    for c, t in zip(clipped, tensors):
        np.testing.assert_allclose(c.asnumpy(), t.grad.numpy(), atol=1e-6)
