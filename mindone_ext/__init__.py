"""Qwen2.5-Omni on MindSpore."""
from .models.qwen2_5_omni import Qwen2_5OmniForConditionalGeneration

__all__ = ["Qwen2_5OmniForConditionalGeneration"]
__version__ = "0.1.0"
