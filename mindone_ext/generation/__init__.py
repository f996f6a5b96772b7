from .decode import CompiledDecoder, token_embeddings
from .loop import DecodeRequest, Step, TokenLookup, TokenLoop, look_up_together
from .sampling import Sampler, SamplingConfig

__all__ = ["CompiledDecoder", "token_embeddings", "DecodeRequest", "Step", "TokenLookup", "TokenLoop",
           "look_up_together", "Sampler", "SamplingConfig"]
