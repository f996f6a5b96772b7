from .decode import CompiledDecoder, token_embeddings
from .loop import DecodeRequest, Step, TokenLoop
from .sampling import Sampler, SamplingConfig

__all__ = ["CompiledDecoder", "token_embeddings", "DecodeRequest", "Step", "TokenLoop", "Sampler", "SamplingConfig"]
