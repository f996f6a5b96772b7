from .mm_info import process_mm_info
from .model import Qwen2_5OmniForConditionalGeneration
from .processing import Qwen2_5OmniProcessor
from .thinker import Qwen2_5OmniThinkerForConditionalGeneration

__all__ = ["Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniProcessor", "Qwen2_5OmniThinkerForConditionalGeneration",
           "process_mm_info"]
