from .decode import CompiledDecoder
from .loop import generate_tokens, iter_tokens
from .sampling import Sampler, SamplingConfig

__all__ = ["CompiledDecoder", "generate_tokens", "iter_tokens", "Sampler", "SamplingConfig"]
