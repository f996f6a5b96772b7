"""The server's limits and defaults, and the per-answer settings a client may change within them."""
from dataclasses import dataclass, fields
from typing import Optional

from ..bundled import RELEASE_TALKER_TOKENS

AUDIO_IN_RATE = 16000  # what the model hears
MODALITIES = ("text", "audio")
ENGINES = ("batched", "interleaved")


@dataclass
class ServeOptions:
    max_active: int = 4  # answers generated at once (0: as many as cache_memory_mb holds, see memory.py)
    engine: str = "batched"  # "batched": the active answers' decode steps run together; "interleaved": one by one
    max_queue: int = 8  # answers waiting beyond those; more are refused as busy
    max_sessions: int = 16  # open WebSocket conversations
    idle_timeout: float = 300.0  # seconds a conversation may stay silent before it is closed
    max_audio_seconds: float = 30.0  # one user turn (the feature extractor's window is 30 s)
    max_image_pixels: int = 4096 * 4096  # one image, by its declared size (the model sees at most ~12.8 million)
    max_message_bytes: int = 1 << 20  # one WebSocket frame
    max_request_bytes: int = 32 << 20  # one HTTP request body (media come base64 encoded)
    max_context_tokens: int = 8192  # tokens of one conversation or request, prompt and answers (at most the model's context)
    max_new_tokens: int = 256  # text tokens of an answer, at most
    talker_max_new_tokens: int = RELEASE_TALKER_TOKENS  # codec tokens of an answer (50 per second of speech), at most
    speaker: str = "Chelsie"
    api_key: Optional[str] = None
    allowed_origins: str = ""  # web pages (besides this server's own) that may call it: comma-separated origins
    stall_timeout: float = 600.0  # seconds one model step may take before /health/live answers 503
    # the memory the limits above may need for KV caches and conversations' states, at most (checked at start)
    cache_memory_mb: Optional[float] = None
    warmup: bool = True  # spoken turns through the model before serving (warmup.py): the first client's is warm

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if self.max_active < 0 or self.max_queue < 0:
            raise ValueError(f"max_active and max_queue must be >= 0; got {self.max_active} and {self.max_queue}")
        if self.cache_memory_mb is not None and not self.cache_memory_mb > 0:
            raise ValueError(f"cache_memory_mb must be > 0; got {self.cache_memory_mb}")


class BadSetting(ValueError):
    """A client's setting that is unknown, of the wrong type or out of range; the message names it,
    `name` is the setting's."""

    def __init__(self, message, name=None):
        super().__init__(message)
        self.name = name


@dataclass
class AnswerSettings:
    """What one conversation asks of its answers (WebSocket "config" messages, or an HTTP request)."""
    speaker: str
    max_new_tokens: int
    talker_max_new_tokens: int
    audio: bool = True  # speak the answer
    seed: Optional[int] = None  # sampling and the ODE noise; None: fresh each answer
    temperature: Optional[float] = None  # > 0: the Thinker samples; greedy otherwise
    top_p: Optional[float] = None

    @classmethod
    def defaults(cls, options):
        return cls(options.speaker, options.max_new_tokens, options.talker_max_new_tokens)

    def update(self, values, options, speakers):
        """Apply client values (speaker, max_new_tokens, talker_max_new_tokens, modalities, seed,
        temperature, top_p)."""
        known = {f.name for f in fields(self)} - {"audio"} | {"modalities"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BadSetting(f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}", unknown[0])
        if "speaker" in values:
            speaker = values["speaker"]
            if not isinstance(speaker, str) or speaker not in speakers:
                listed = ", ".join(sorted(speakers)) or "none (this server speaks no answers)"
                raise BadSetting(f"unknown speaker {speaker!r}; available: {listed}", "speaker")
            self.speaker = speaker
        for name, cap in (("max_new_tokens", options.max_new_tokens),
                          ("talker_max_new_tokens", options.talker_max_new_tokens)):
            if name in values:
                setattr(self, name, _int_in(values[name], name, 1, cap))
        if "modalities" in values:
            self.audio = wants_audio(values["modalities"])
        if "seed" in values:
            self.seed = None if values["seed"] is None else _int_in(values["seed"], "seed", 0, 2 ** 63 - 1)
        for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            if name in values:
                setattr(self, name, _float_in(values[name], name, low, high))

    def generate_kwargs(self):
        kwargs = dict(max_new_tokens=self.max_new_tokens, return_audio=self.audio, seed=self.seed)
        if self.temperature:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p or 1.0)
        if self.audio:
            kwargs.update(spk=self.speaker, talker_max_new_tokens=self.talker_max_new_tokens)
        return kwargs


def wants_audio(modalities):
    if not (isinstance(modalities, list) and modalities
            and all(isinstance(m, str) and m in MODALITIES for m in modalities)):
        raise BadSetting(f"modalities must be a non-empty list of {list(MODALITIES)}, got {modalities!r}",
                         "modalities")
    if "text" not in modalities:
        raise BadSetting('modalities must include "text" (the model speaks what it writes)', "modalities")
    return "audio" in modalities


def _int_in(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadSetting(f"{name} must be an integer in [{low}, {high}], got {value!r}", name)
    return value


def _float_in(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadSetting(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)
