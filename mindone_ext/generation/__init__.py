from .cache_pool import TokenLookup
from .decode import CompiledDecoder
from .loop import DecodeRequest, Step, TokenLoop
from .sampling import Sampler, SamplingConfig

__all__ = ["CompiledDecoder", "TokenLookup", "DecodeRequest", "Step", "TokenLoop", "Sampler", "SamplingConfig"]
