from .decode import CompiledDecoder
from .loop import iter_tokens
from .sampling import Sampler, SamplingConfig

__all__ = ["CompiledDecoder", "iter_tokens", "Sampler", "SamplingConfig"]
