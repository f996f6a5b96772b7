"""POST /v1/chat/completions in the shape of OpenAI's chat completions, so existing clients (the
`openai` package among them) talk to the model: text and `input_audio` / `image_url` parts in,
text and speech out, whole or streamed as server-sent events.

What is honoured: messages (system, user, assistant; string or part-list content),
modalities (["text"] or ["text", "audio"]), audio.voice (a speaker of the checkpoint),
audio.format ("pcm16": 16-bit 24 kHz mono; "wav" when not streaming), stream,
stream_options.include_usage, max_completion_tokens / max_tokens, seed, temperature and top_p
(sampling when temperature > 0; greedy otherwise, the default), n (1); and one of ours,
talker_max_new_tokens (codec tokens of the spoken answer, 50 per second). Other fields are ignored.
Media come inline only (base64), never as paths or URLs the server would open.
"""
import base64
import binascii
import io
import time
import uuid
import wave

import numpy as np

from ..models.qwen2_5_omni.session import SYSTEM_PROMPT
from ..utils.media import MediaError, load_audio, load_image
from .options import AUDIO_IN_RATE, AnswerSettings, BadSetting

OUTPUT_RATE = 24000


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


class ChatRequest:
    """A request body, checked: the conversation (media decoded), the answer settings, the output."""

    def __init__(self, body, options, model):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self.model_name = body.get("model") or "qwen2.5-omni"
        self.stream = _typed(body, "stream", bool, False)
        self.include_usage = bool((_typed(body, "stream_options", dict, None) or {}).get("include_usage"))
        if _typed(body, "n", int, 1) != 1:
            raise ApiError(400, "n must be 1", "n")
        values = {"modalities": body.get("modalities", ["text"])}
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None:
            values["max_new_tokens"] = limit
        for name in ("seed", "temperature", "top_p", "talker_max_new_tokens"):  # the last: our extension
            if body.get(name) is not None:
                values[name] = body[name]
        audio = _typed(body, "audio", dict, None) or {}
        if "voice" in audio:
            values["speaker"] = audio["voice"]
        self.settings = AnswerSettings.defaults(options)
        try:
            self.settings.update(values, options, model.speakers)
        except BadSetting as e:
            raise ApiError(400, str(e), "audio.voice" if "speaker" in str(e) else None) from None
        if self.settings.audio and not model.has_talker:
            raise ApiError(400, 'this server was started without audio output: ask for modalities ["text"]',
                           "modalities")
        self.audio_format = audio.get("format", "pcm16")
        if self.audio_format not in (("pcm16",) if self.stream else ("pcm16", "wav")):
            raise ApiError(400, f"audio.format {self.audio_format!r} is not supported"
                                f"{' when streaming' if self.stream else ''}: use pcm16"
                                f"{'' if self.stream else ' or wav'}", "audio.format")
        self.conversation = _conversation(body.get("messages"), options.max_audio_seconds)
        if self.settings.audio and self.conversation[0]["role"] != "system":
            # the released model speaks only under this system prompt (its model card says so)
            self.conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]})
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.audio_id = f"audio_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def chunk(self, delta=None, finish_reason=None, usage=None):
        """One server-sent event's data (object chat.completion.chunk)."""
        choices = [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_name,
                "choices": choices}
        if usage:
            body["usage"] = usage
        return body

    def text_delta(self, text):
        return {"audio": {"id": self.audio_id, "transcript": text}} if self.settings.audio else {"content": text}

    def audio_delta(self, samples):
        return {"audio": {"id": self.audio_id, "data": base64.b64encode(pcm16(samples)).decode()}}

    def completion(self, text, samples, finish_reason, usage):
        """The whole answer (object chat.completion)."""
        message = {"role": "assistant", "content": None if self.settings.audio else text}
        if self.settings.audio:
            data = pcm16(samples) if self.audio_format == "pcm16" else wav_bytes(samples)
            message["audio"] = {"id": self.audio_id, "data": base64.b64encode(data).decode(),
                                "expires_at": self.created + 3600, "transcript": text}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}], "usage": usage}


def prepare_inputs(processor, conversation):
    """The processor's inputs for a conversation whose media are already decoded (numpy, PIL)."""
    from ..models.qwen2_5_omni.mm_info import process_mm_info

    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    audios, images, _ = process_mm_info(conversation)
    return processor(text, audio=audios, images=images)


def pcm16(samples):
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def wav_bytes(samples):
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(OUTPUT_RATE)
        f.writeframes(pcm16(samples))
    return out.getvalue()


def _typed(body, name, kind, default):
    value = body.get(name, default)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ApiError(400, f"{name} must be a {kind.__name__}, got {value!r}", name)
    return value


def _conversation(messages, max_audio_seconds):
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    conversation = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"{where} must be an object with role system, user or assistant", where)
        role = "system" if message["role"] == "developer" else message["role"]
        content = message.get("content")
        if content is None and role == "assistant":
            content = (message.get("audio") or {}).get("transcript", "")  # an earlier spoken answer
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
        conversation.append({"role": role, "content": [_part(part, f"{where}.content[{j}]", max_audio_seconds)
                                                       for j, part in enumerate(content)]})
    if conversation[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    return conversation


def _part(part, where, max_audio_seconds):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        try:
            samples = load_audio(_base64(audio.get("data"), where), what=f"{where} audio")
        except MediaError as e:
            raise ApiError(400, str(e), where) from None
        if len(samples) > max_audio_seconds * AUDIO_IN_RATE:
            raise ApiError(400, f"{where}: {len(samples) / AUDIO_IN_RATE:.1f} s of audio; at most "
                                f"{max_audio_seconds:g} s per clip", where, "audio_too_long")
        return {"type": "audio", "audio": samples}
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url", "")
        header, _, payload = url.partition(",") if isinstance(url, str) else ("", "", "")
        if not (header.startswith("data:") and header.endswith(";base64")):
            raise ApiError(400, f"{where}: images come inline, as a base64 data URL", where)
        try:
            return {"type": "image", "image": load_image(_base64(payload, where))}
        except MediaError as e:
            raise ApiError(400, str(e), where) from None
    raise ApiError(400, f"{where}: a part is {{type: text | input_audio | image_url}} with its field", where)


def _base64(data, where):
    if not isinstance(data, str) or not data:
        raise ApiError(400, f"{where}: missing base64 data", where)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{where}: invalid base64 data ({e})", where) from None
