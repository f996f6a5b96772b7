"""`process_mm_info` where the existing MindSpore port's snippets import it from
(`...models.qwen2_5_omni.qwen_omni_utils`)."""
from .mm_info import process_mm_info

__all__ = ["process_mm_info"]
