"""Fine-tuning data: local datasets read as chat conversations, batched for the Thinker with labels
on the assistant's tokens only.

A dataset path is one of
- a JSONL file (or a folder of them): one row per line;
- a Parquet file, or a folder holding Parquet files anywhere below it (a Hugging Face dataset
  repository as downloaded, e.g. `data/train-00000-of-00001.parquet`);
- a folder written by `datasets.Dataset.save_to_disk` (Arrow files with `state.json`).

A row is either a conversation, `{"messages": [{"role": "user", "content": [{"type": "image",
"image": "a.png"}, {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}`,
or a flat record: media under "image", "audio" and/or "video" (a path relative to the dataset, or
the `{"bytes", "path"}` struct `datasets` stores images as), an optional "prompt" and the answer
under the answer column ("answer", "text", "transcript" or "response", first found, unless named).
A LaTeX OCR set (image + text), an ASR set (audio + transcript) and spoken question answering
(audio + answer) are all flat records.

Rows that cannot be used (malformed JSON or UTF-8, a missing media file, an empty answer,
malformed content, text holding the chat's special tokens, media that does not decode or is too
large) are skipped and counted by reason, never fatal; a dataset path that does not exist or
holds no rows is an error. Media given as http(s) URLs are fetched only with `allow_remote=True`
(a dataset should not make a training machine download what it names).
"""
import glob
import json
import logging
import os
import re
from collections import Counter

import numpy as np

from ..models.qwen2_5_omni.mm_info import process_mm_info
from ..utils.media import MediaError

logger = logging.getLogger(__name__)

MEDIA_KINDS = ("image", "audio", "video")
ANSWER_COLUMNS = ("answer", "text", "transcript", "response")
IGNORE_INDEX = -100
# the processor expands media placeholders and the labels follow the chat markers: in a row's own
# text they would make the prompt disagree with its media or its labels
SPECIAL_TEXT = re.compile(r"<\|(IMAGE|AUDIO|VIDEO|vision_bos|vision_eos|audio_bos|audio_eos|im_start|im_end|"
                          r"endoftext)\|>")


class DatasetError(ValueError):
    """A dataset that cannot be read at all; the message names the problem."""


class BadRow(ValueError):
    """One row that cannot be used; its message is the reason it is counted under."""


# ---------------------------------------------------------------- reading rows

def _jsonl_rows(path):
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield BadRow("not UTF-8")
                continue
            except (ValueError, RecursionError):
                yield BadRow("malformed JSON")
                continue
            yield row if isinstance(row, dict) else BadRow("row is not a JSON object")


def _table_rows(table):
    for row in table.to_pylist():
        yield row


def _parquet_rows(path):
    import pyarrow.parquet as pq

    yield from _table_rows(pq.read_table(path))


def _arrow_rows(path):
    import pyarrow as pa

    with pa.memory_map(path) as source:
        yield from _table_rows(pa.ipc.open_stream(source).read_all())


def dataset_files(path):
    """The files a dataset path stands for, in a stable order, with their reader."""
    if not os.path.exists(path):
        raise DatasetError(f"dataset path {path!r} does not exist")
    if os.path.isfile(path):
        files = [path]
    elif os.path.isfile(os.path.join(path, "state.json")):  # datasets.save_to_disk
        with open(os.path.join(path, "state.json")) as f:
            files = [os.path.join(path, d["filename"]) for d in json.load(f).get("_data_files", [])]
    else:
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)) or sorted(
            glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True))
    readers = {".jsonl": _jsonl_rows, ".json": _jsonl_rows, ".parquet": _parquet_rows, ".arrow": _arrow_rows}
    found = [(f, readers.get(os.path.splitext(f)[1])) for f in files]
    unknown = [f for f, reader in found if reader is None]
    if unknown or not found:
        raise DatasetError(f"{path!r} is not a dataset this reads (JSONL, Parquet, or a datasets.save_to_disk "
                           f"folder){': cannot read ' + unknown[0] if unknown else ': no data files found'}")
    return found


# ---------------------------------------------------------------- rows -> conversations

def _media_source(value, base_dir, kind, allow_remote=False):
    """A loadable source for one media value: bytes, or a path made absolute and checked."""
    if isinstance(value, dict):  # datasets' Image/Audio struct
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise BadRow(f"no {kind}")
    if value.startswith(("http://", "https://")) and not allow_remote:
        raise BadRow(f"remote {kind} (fetching is off: allow_remote / --allow_remote_media)")
    if "://" in value or value.startswith("data:"):
        return value
    path = value if os.path.isabs(value) else os.path.join(base_dir, value)
    if not os.path.isfile(path):
        raise BadRow(f"missing {kind} file")
    return path


def _text_of(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(item.get("text", "") for item in content if isinstance(item, dict))
    return ""


def _checked_text(text):
    if not isinstance(text, str):
        raise BadRow("malformed content item")
    if SPECIAL_TEXT.search(text):
        raise BadRow("text holds a special token")
    return text


def _resolve_conversation(messages, base_dir, allow_remote=False):
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise BadRow("malformed messages")
    resolved = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            items = []
            for item in content:
                if isinstance(item, str):  # a bare string is text
                    item = {"type": "text", "text": item}
                if not isinstance(item, dict):
                    raise BadRow("malformed content item")
                kind = next((k for k in MEDIA_KINDS if k in item), None)
                if kind:
                    items.append(dict(item, **{kind: _media_source(item[kind], base_dir, kind, allow_remote)}))
                else:
                    items.append(dict(item, text=_checked_text(item.get("text", ""))))
            content = items
        elif content is None or isinstance(content, str):
            content = _checked_text(content or "")
        else:
            raise BadRow("malformed content")
        resolved.append({"role": message["role"], "content": content})
    answers = [m for m in resolved if m["role"] == "assistant"]
    if not answers:
        raise BadRow("no assistant message")
    if not all(_text_of(m["content"]).strip() for m in answers):
        raise BadRow("empty answer")
    return resolved


def row_to_conversation(row, base_dir, prompt=None, answer_column=None, system_prompt=None, allow_remote=False):
    """One dataset row as a chat conversation; raises BadRow naming why it cannot be used."""
    messages = row.get("messages", row.get("conversations"))
    if messages is not None:
        conversation = _resolve_conversation(messages, base_dir, allow_remote)
    else:
        column = answer_column or next((c for c in ANSWER_COLUMNS if c in row), None)
        answer = row.get(column) if column else None
        if not isinstance(answer, str) or not answer.strip():
            raise BadRow("empty answer")
        _checked_text(answer)
        content = []
        for kind in MEDIA_KINDS:
            values = row.get(kind)
            for value in values if isinstance(values, list) else ([] if values is None else [values]):
                content.append({"type": kind, kind: _media_source(value, base_dir, kind, allow_remote)})
        question = row.get("prompt") or row.get("question") or prompt
        if question:
            content.append({"type": "text", "text": _checked_text(question)})
        if not content:
            raise BadRow("no prompt and no media")
        conversation = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    if system_prompt and conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] + conversation
    return conversation


class ConversationDataset:
    """Every usable row of a dataset path as a conversation; `skipped` counts the others by reason."""

    def __init__(self, path, prompt=None, answer_column=None, system_prompt=None, allow_remote=False):
        self.path = path
        base_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        self.conversations, self.skipped = [], Counter()
        for file, read in dataset_files(path):
            for row in read(file):
                try:
                    if isinstance(row, BadRow):
                        raise row
                    self.conversations.append(row_to_conversation(row, base_dir, prompt, answer_column, system_prompt,
                                                                  allow_remote))
                except BadRow as e:
                    self.skipped[str(e)] += 1
        if self.skipped:
            logger.warning("%s: skipped %d row(s): %s", path, sum(self.skipped.values()), dict(self.skipped))
        if not self.conversations:
            raise DatasetError(f"dataset {path!r} has no usable rows (skipped: {dict(self.skipped) or 'none'})")

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, i):
        return self.conversations[i]


# ---------------------------------------------------------------- batches

def assistant_labels(input_ids, tokenizer):
    """Labels equal to input_ids on the assistant's answers (their text and closing <|im_end|>),
    IGNORE_INDEX everywhere else: system and user turns, the "<|im_start|>assistant\\n" header,
    media placeholders and padding."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer.encode("assistant\n", add_special_tokens=False)
    labels = np.full_like(input_ids, IGNORE_INDEX)
    for row, ids in enumerate(input_ids):
        ids = ids.tolist()
        i = 0
        while i < len(ids):
            if ids[i] == start and ids[i + 1:i + 1 + len(header)] == header:
                first = i + 1 + len(header)
                last = ids.index(end, first) if end in ids[first:] else len(ids) - 1
                labels[row, first:last + 1] = input_ids[row, first:last + 1]
                i = last
            i += 1
    return labels


class Collator:
    """Conversations -> one padded batch for the Thinker plus labels. A conversation whose media
    fails to decode is dropped from the batch and counted in `skipped`."""

    def __init__(self, processor, use_audio_in_video=False, max_length=None):
        self.processor, self.use_audio_in_video, self.max_length = processor, use_audio_in_video, max_length
        self.skipped = Counter()

    def __call__(self, conversations):
        kept, audios, images, videos, fps = [], [], [], [], []
        for conversation in conversations:
            try:
                a, i, v, kwargs = process_mm_info(conversation, self.use_audio_in_video, return_video_kwargs=True)
            except MediaError:
                self.skipped["media does not decode or is too large"] += 1
                continue
            kept.append(conversation)
            audios += a or []
            images += i or []
            videos += v or []
            fps += kwargs["fps"]
        if not kept:
            return None
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=False) for c in kept]
        batch = self.processor(texts, audio=audios or None, images=images or None, videos=videos or None,
                               use_audio_in_video=self.use_audio_in_video, fps=fps or 2.0)
        lengths = batch["attention_mask"].sum(1)
        if self.max_length and lengths.max() > self.max_length:  # rare: drop the long ones, batch the rest
            self.skipped["longer than max_length"] += int((lengths > self.max_length).sum())
            return self([c for c, n in zip(kept, lengths) if n <= self.max_length])
        batch["labels"] = assistant_labels(batch["input_ids"], self.processor.tokenizer)
        if self.use_audio_in_video:
            batch["use_audio_in_video"] = True
        return batch
