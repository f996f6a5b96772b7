from .mm_info import process_mm_info
from .model import Qwen2_5OmniForConditionalGeneration
from .processing import Qwen2_5OmniProcessor
from .session import ConversationSession
from .streaming import AudioChunk, TextDelta
from .thinker import Qwen2_5OmniThinkerForConditionalGeneration
from .token2wav_stream import StreamChunking

__all__ = ["AudioChunk", "ConversationSession", "Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniProcessor",
           "Qwen2_5OmniThinkerForConditionalGeneration", "StreamChunking", "TextDelta", "process_mm_info"]
