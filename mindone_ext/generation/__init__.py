from .decode import CompiledDecoder
from .loop import DecodeRequest, Step, TokenLoop
from .sampling import Sampler, SamplingConfig

__all__ = ["CompiledDecoder", "DecodeRequest", "Step", "TokenLoop", "Sampler", "SamplingConfig"]
