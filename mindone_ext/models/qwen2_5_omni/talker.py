"""The Talker: a Qwen2 decoder over codec tokens. Its input is a projection of what the Thinker
produced (last hidden state + token embedding, per token) plus the embedding of the previous
codec token. Names mirror the reference (`talker.thinker_to_talker_proj`, `talker.model.*`,
`talker.codec_head`)."""
import mindspore as ms
from mindspore import Tensor, nn

from ...nn.decoder import Qwen2Decoder
from ...nn.layers import Linear


class Qwen2_5OmniTalkerForConditionalGeneration(nn.Cell):
    def __init__(self, config, dtype=ms.float32, attn_implementation="eager"):
        super().__init__()
        self.config = config
        self.thinker_to_talker_proj = Linear(config.embedding_size, config.hidden_size, True, dtype)
        self.model = Qwen2Decoder(config, dtype, attn_implementation, embedding_size=config.embedding_size)
        self.codec_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        self.codec_bos_token = config.tts_codec_start_token_id
        self.codec_eos_token = config.tts_codec_end_token_id
        self.codec_pad_token = config.tts_codec_pad_token_id
        self.codec_mask_token = config.tts_codec_mask_token_id
        self.text_bos_token = config.tts_text_start_token_id
        self.text_eos_token = config.tts_text_end_token_id
        self.text_pad_token = config.tts_text_pad_token_id

    def codec_embedding(self, ids):
        return self.model.embed_tokens.lookup(ids)

    def construct(self, inputs_embeds, position_ids, attention_mask):
        """Full-sequence forward on thinker-space embeddings (B, T, embedding_size); returns
        float32 codec logits (B, T, vocab)."""
        hidden = self.model(self.thinker_to_talker_proj(inputs_embeds), Tensor(position_ids, ms.int32),
                            Tensor(attention_mask, ms.int32))
        return self.codec_head(hidden).astype(ms.float32)
