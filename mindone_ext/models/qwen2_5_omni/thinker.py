"""The Thinker: Qwen2.5 text decoder with TMRoPE and its LM head.

Names and forward arguments mirror the reference (`thinker.model.layers.N...`, `thinker.lm_head`,
`thinker(input_ids=..., attention_mask=...)` returning an output with `.logits`).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from ...nn.decoder import Qwen2Decoder
from ...nn.layers import Linear
from .rope_index import text_rope_index


@dataclass
class ThinkerOutput:
    logits: Tensor
    last_hidden_state: Tensor
    rope_deltas: Optional[np.ndarray] = None


def as_numpy(x, dtype=None):
    if x is None:
        return None
    if isinstance(x, Tensor):
        x = x.asnumpy()
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


class Qwen2_5OmniThinkerForConditionalGeneration(nn.Cell):
    def __init__(self, config, dtype=ms.float32, attn_implementation="eager"):
        super().__init__()
        self.config = config
        text = config.text_config
        self.model = Qwen2Decoder(text, dtype, attn_implementation)
        self.lm_head = Linear(text.hidden_size, text.vocab_size, False, dtype)
        self.tied_word_embeddings = bool(getattr(text, "tie_word_embeddings", False))
        if self.tied_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def embed(self, input_ids):
        return self.model.embed_tokens(Tensor(as_numpy(input_ids, np.int32)))

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **unused):
        """Full-sequence forward without a cache (parity tests, training)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        b, t = inputs_embeds.shape[:2]
        mask = np.ones((b, t), np.int32) if attention_mask is None else as_numpy(attention_mask, np.int32)
        rope_deltas = None
        if position_ids is None:
            position_ids, rope_deltas = text_rope_index(mask)
        position_ids = as_numpy(position_ids, np.int32)
        if position_ids.ndim == 2:
            position_ids = np.broadcast_to(position_ids, (3,) + position_ids.shape)
        hidden, _ = self.model(inputs_embeds, Tensor(position_ids), Tensor(mask))
        return ThinkerOutput(self.lm_head(hidden), hidden, rope_deltas)
