"""Qwen2.5-Omni on MindSpore."""
from .models.qwen2_5_omni import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor, process_mm_info

__all__ = ["Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniProcessor", "process_mm_info"]
__version__ = "0.1.0"
