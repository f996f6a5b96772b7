"""A training step's forward, loss and backward as one compiled graph (`mindspore.jit` over
`mindspore.value_and_grad`), for adapters on the Thinker's language model.

What varies per batch is done on the host first: the prompt's embeddings (audio and vision
features merged in; the encoders and the embedding table are frozen, so nothing there needs a
gradient), TMRoPE positions, and which positions carry a label. The sequence is right-padded to
a bucketed length and the labelled positions to a bucketed count (padding is invalid / weighs
zero), so a handful of graphs serve a whole dataset. The result equals `causal_lm_loss_sum`'s,
taken op by op, to float32 rounding (tests/training/test_compiled_step.py).
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ..generation.decode import bucket
from ..nn.lora import lora_layers
from .loss import labelled_positions


def outside_language_model(thinker):
    """The Thinker's adapted layers the compiled step cannot train (those not in its decoder)."""
    return [name for name, _ in lora_layers(thinker) if not name.startswith("model.")]


class CompiledLossGrad:
    """`step(batch, scale)` -> (scale x the batch's summed loss over labelled tokens, gradients of
    that for `params`), as `value_and_grad` of `causal_lm_loss_sum(thinker, batch)[0] * scale`."""

    def __init__(self, thinker, params):
        outside = outside_language_model(thinker)
        if outside:
            raise ValueError(f"the compiled step trains adapters of the language model only; {outside[0]} is not "
                             "(train encoder adapters with the op-by-op step)")
        self.thinker = thinker

        def loss(embeds, position_ids, valid, rows, targets, weights):
            hidden = thinker.model(embeds, position_ids, valid)
            b, t, h = hidden.shape
            picked = ops.gather(hidden.reshape(b * t, h), rows, 0)
            log_probs = ops.log_softmax(thinker.lm_head(picked).astype(ms.float32), -1)
            chosen = ops.gather_elements(log_probs, 1, targets.reshape(-1, 1)).reshape(-1)
            return -(chosen * weights).sum()

        self._value_and_grad = ms.jit(ms.value_and_grad(loss, None, params))

    def __call__(self, batch, scale=1.0):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        prepared = self.thinker.prepare_inputs(**inputs)
        embeds, positions, valid = prepared.inputs_embeds, prepared.position_ids, prepared.attention_mask
        b, t, _ = embeds.shape
        width = bucket(t, 64)
        if width > t:  # right padding: invalid, and after every real token, so never attended
            embeds = ops.cat((embeds, ops.zeros((b, width - t, embeds.shape[2]), embeds.dtype)), 1)
            positions = np.concatenate([positions, np.zeros((3, b, width - t), positions.dtype)], -1)
            valid = np.concatenate([valid, np.zeros((b, width - t), valid.dtype)], 1)
        rows, targets = labelled_positions(batch["labels"], width)
        count = bucket(len(rows), 16)
        weights = np.zeros(count, np.float32)
        weights[:len(rows)] = scale
        return self._value_and_grad(
            embeds, Tensor(positions, ms.int32), Tensor(valid, ms.int32),
            Tensor(np.pad(rows, (0, count - len(rows))).astype(np.int32)),
            Tensor(np.pad(targets, (0, count - len(rows))).astype(np.int32)), Tensor(weights))
