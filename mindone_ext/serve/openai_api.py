"""POST /v1/chat/completions in the shape of OpenAI's chat completions, so existing clients (the
`openai` package among them) talk to the model: text and `input_audio` / `image_url` parts in,
text and speech out, whole or streamed as server-sent events.

What is honoured: messages (system, user, assistant; string or part-list content; an earlier
spoken answer by its `audio.id`), modalities (["text"] or ["text", "audio"]), audio.voice (a
speaker of the checkpoint), audio.format ("pcm16": 16-bit 24 kHz mono; "wav" when not streaming),
stream, stream_options.include_usage, max_completion_tokens / max_tokens, seed, temperature and
top_p (sampling when temperature > 0; greedy otherwise, the default), n (1); and one of ours,
talker_max_new_tokens (codec tokens of the spoken answer, 50 per second). Fields that do not
change the answer (user, metadata, ...) are accepted; anything else that would change it and is
not implemented (tools, stop, response_format, logprobs, penalties, ...) is refused with a 400
naming it, never silently ignored. Media come inline only (base64), never as paths or URLs the
server would open.
"""
import base64
import binascii
import collections
import json
import threading
import time
import uuid

from ..models.qwen2_5_omni.session import SYSTEM_PROMPT
from ..utils.audio import load_audio, pcm16, wav_bytes
from ..utils.media import MediaError, MediaTooLong, load_image
from .options import AnswerSettings, BadSetting

OUTPUT_RATE = 24000
ANSWERED = ("model", "messages", "modalities", "audio", "stream", "stream_options", "max_completion_tokens",
            "max_tokens", "seed", "temperature", "top_p", "n", "talker_max_new_tokens")
NO_EFFECT = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
             "parallel_tool_calls")
# Not implemented: refused unless given as the value that means "off".
OFF_VALUES = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
              "function_call": (None, "none"), "stop": (None, [], ""), "logprobs": (None, False),
              "top_logprobs": (None, 0), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
              "logit_bias": (None, {}), "response_format": (None, {"type": "text"}), "prediction": (None,),
              "reasoning_effort": (None,), "web_search_options": (None,)}
AUDIO_EXPIRY_SECONDS = 3600


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


class AudioTranscripts:
    """What each spoken answer said, by its audio id, for an hour (as OpenAI keeps them): a later
    request may send the assistant's turn as just {"audio": {"id": ...}}. At most `capacity` kept."""

    def __init__(self, capacity=10000):
        self.capacity, self.items, self.lock = capacity, collections.OrderedDict(), threading.Lock()

    def remember(self, audio_id, transcript):
        with self.lock:
            self.items[audio_id] = (time.time() + AUDIO_EXPIRY_SECONDS, transcript)
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)

    def recall(self, audio_id):
        with self.lock:
            expires, transcript = self.items.get(audio_id, (0, None))
        return transcript if time.time() < expires else None


class ChatRequest:
    """A request body, checked: the conversation (media decoded), the answer settings, the output."""

    def __init__(self, body, options, model, transcripts=None):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        _refuse_unsupported(body)
        self.model_name = _typed(body, "model", str, None) or "qwen2.5-omni"
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
            self.settings.update({"modalities": values.pop("modalities")}, options, model.speakers)
            if self.settings.audio and not model.has_talker:
                raise ApiError(400, 'this server was started without audio output: ask for modalities ["text"]',
                               "modalities")
            self.settings.update(values, options, model.speakers)
        except BadSetting as e:
            raise ApiError(400, str(e), {"speaker": "audio.voice", "max_new_tokens": "max_completion_tokens"}.get(
                e.name, e.name)) from None
        self.audio_format = audio.get("format", "pcm16")
        if self.audio_format not in (("pcm16",) if self.stream else ("pcm16", "wav")):
            raise ApiError(400, f"audio.format {self.audio_format!r} is not supported"
                                f"{' when streaming' if self.stream else ''}: use pcm16"
                                f"{'' if self.stream else ' or wav'}", "audio.format")
        self.conversation = _conversation(body.get("messages"), options, transcripts)
        if self.settings.audio and self.conversation[0]["role"] != "system":
            # the released model speaks only under this system prompt (its model card says so)
            self.conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]})
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.audio_id = f"audio_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def remember(self, transcripts, text):
        """A spoken answer's transcript, for a later turn that refers to it by its audio id."""
        if self.settings.audio:
            transcripts.remember(self.audio_id, text)

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
            data = pcm16(samples) if self.audio_format == "pcm16" else wav_bytes(samples, OUTPUT_RATE)
            message["audio"] = {"id": self.audio_id, "data": base64.b64encode(data).decode(),
                                "expires_at": self.created + AUDIO_EXPIRY_SECONDS, "transcript": text}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}], "usage": usage}


def prepare_inputs(processor, conversation):
    """The processor's inputs for a conversation whose media are already decoded (numpy, PIL)."""
    from ..models.qwen2_5_omni.mm_info import process_mm_info

    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    audios, images, _ = process_mm_info(conversation)
    return processor(text, audio=audios, images=images)


def _refuse_unsupported(body):
    for name, value in body.items():
        if name in ANSWERED or name in NO_EFFECT:
            continue
        if name not in OFF_VALUES:
            raise ApiError(400, f"unknown field {name!r}", name, "unknown_parameter")
        if not any(value == off and type(value) is type(off) for off in OFF_VALUES[name]):
            raise ApiError(400, f"{name} is not supported by this server (got {json.dumps(value)[:80]}); "
                                "leave it out", name, "unsupported_parameter")


def _typed(body, name, kind, default):
    value = body.get(name, default)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ApiError(400, f"{name} must be a {kind.__name__}, got {json.dumps(value)[:80]}", name)
    return value


def _conversation(messages, options, transcripts):
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
            content = _earlier_answer(message.get("audio"), transcripts, where)
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
        conversation.append({"role": role, "content": [_part(part, f"{where}.content[{j}]", options)
                                                       for j, part in enumerate(content)]})
    if conversation[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    return conversation


def _earlier_answer(audio, transcripts, where):
    """An assistant turn given as {"audio": {"id": ...}}: the transcript of that spoken answer."""
    if audio is None:
        return ""
    audio_id = audio.get("id") if isinstance(audio, dict) else None
    if not isinstance(audio_id, str):
        raise ApiError(400, f"{where}.audio must be {{\"id\": \"audio_...\"}}", f"{where}.audio")
    transcript = transcripts.recall(audio_id) if transcripts is not None else None
    if transcript is None:
        raise ApiError(400, f"{where}.audio.id {audio_id!r} is not a spoken answer of this server from the "
                            "last hour: send its transcript as content instead", f"{where}.audio.id")
    return transcript


def _part(part, where, options):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict):
            raise ApiError(400, f"{where}.input_audio must be an object with base64 data", where)
        try:
            samples = load_audio(_base64(audio.get("data"), where), what=f"{where} audio",
                                 max_seconds=options.max_audio_seconds)
        except MediaError as e:
            raise ApiError(400, str(e), where, "audio_too_long" if isinstance(e, MediaTooLong) else None) from None
        return {"type": "audio", "audio": samples}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        header, _, payload = url.partition(",") if isinstance(url, str) else ("", "", "")
        if not (header.startswith("data:") and header.endswith(";base64")):
            raise ApiError(400, f"{where}: images come inline, as a base64 data URL", where)
        try:
            return {"type": "image", "image": load_image(_base64(payload, where), options.max_image_pixels)}
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
