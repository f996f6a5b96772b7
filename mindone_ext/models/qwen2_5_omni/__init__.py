"""Qwen2.5-Omni: the model, its processor and media loading. Each name is imported on first use,
so media loading and the processor work without loading MindSpore."""
import importlib

_WHERE = {"process_mm_info": ".mm_info", "Qwen2_5OmniForConditionalGeneration": ".model",
          "Qwen2_5OmniProcessor": ".processing", "ConversationSession": ".session", "AudioChunk": ".streaming",
          "TextDelta": ".streaming", "Qwen2_5OmniThinkerForConditionalGeneration": ".thinker",
          "StreamChunking": ".token2wav_stream"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
