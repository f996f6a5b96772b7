"""Building blocks shared by every model in mindone_ext."""
from .attention import attention, check_attn_implementation
from .decoder import Qwen2Decoder
from .device import on_ascend, storage_dtype
from .layers import Embedding, Linear, RMSNorm

__all__ = ["attention", "check_attn_implementation", "Qwen2Decoder", "on_ascend", "storage_dtype", "Embedding",
           "Linear", "RMSNorm"]
