"""Streaming output's events: text and speech of one answer as they are produced (the pipeline
that produces them is answer.Answer)."""
from dataclasses import dataclass

import mindspore as ms


SAMPLE_RATE = 24000


@dataclass
class TextDelta:
    """One Thinker token: its id and the text it completes (empty while a UTF-8 character is
    split across tokens, or without a tokenizer)."""
    token_id: int
    text: str


@dataclass
class AudioChunk:
    """Waveform samples that follow the previous chunk's: a float32 mindspore.Tensor (samples,)
    in [-1, 1] at 24 kHz (`np.asarray(chunk.audio)` for numpy)."""
    audio: ms.Tensor
    sample_rate: int = SAMPLE_RATE


class TextDecoder:
    """Token ids -> newly completed text. Byte-level BPE can split a character over tokens; text
    ending in U+FFFD (an incomplete character) is held back until the next token completes it.

    Each step decodes only the tokens since the text last emitted, after those of the emission
    before it (context for a tokenizer whose decode of a piece depends on what precedes it):
    decoding every id so far made an answer's text quadratic (8000 tokens: 7.0 s, 1.2 ms a step at
    the end, on the model's thread)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.context = self.emitted = 0  # ids[context:emitted] were emitted last time, ids[:emitted] in all

    def push(self, token_id, final=False):
        if self.tokenizer is None:
            return ""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.context:self.emitted], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.context:], skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return ""
        self.context, self.emitted = self.emitted, len(self.ids)
        return text[len(before):]
