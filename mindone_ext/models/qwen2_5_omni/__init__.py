from .model import Qwen2_5OmniForConditionalGeneration
from .thinker import Qwen2_5OmniThinkerForConditionalGeneration

__all__ = ["Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniThinkerForConditionalGeneration"]
