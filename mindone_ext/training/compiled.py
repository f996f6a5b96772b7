"""A training step's forward, loss and backward as compiled graphs, for adapters on the Thinker's
language model: each decoder layer's forward and backward as graphs shared by the layers
(training/layer_grad.py), and the loss head's value and gradient as one more. Adapters on the
audio and vision encoders train too: the encoders then run op by op under `mindspore.vjp`, whose
backward takes the gradient of the prompt's embeddings from the decoder's first layer.

What varies per batch is done on the host first: the prompt's embeddings (audio and vision
features merged in), TMRoPE positions, and which positions carry a label. The sequence is
right-padded to a bucketed length and the labelled positions to a bucketed count (padding is
invalid / weighs zero), so a handful of graphs serve a whole dataset. The result equals
`causal_lm_loss_sum`'s, taken op by op, to float32 rounding (tests/training/test_compiled_step.py).
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ..generation.decode import bucket
from ..nn.kv_cache import causal_mask
from ..nn.lora import lora_layers
from .layer_grad import layer_graphs, layer_parts
from .loss import labelled_positions

DECODER, ENCODERS = "model.", ("audio_tower.", "visual.")


def outside_language_model(thinker):
    """The Thinker's adapted layers the compiled step cannot train (those neither in its decoder
    nor in its encoders, e.g. the LM head)."""
    return [name for name, _ in lora_layers(thinker) if not name.startswith((DECODER,) + ENCODERS)]


class CompiledLossGrad:
    """`step(batch, scale)` -> (scale x the batch's summed loss over labelled tokens, gradients of
    that for `params`), as `value_and_grad` of `causal_lm_loss_sum(thinker, batch)[0] * scale`.
    `recompute`: keep only each layer's input between the forward and the backward pass (the
    layer's forward runs again in its backward graph) instead of its projections' outputs too."""

    def __init__(self, thinker, params, recompute=False):
        outside = outside_language_model(thinker)
        if outside:
            raise ValueError(f"the compiled step trains adapters of the language model and the encoders; {outside[0]} "
                             "is neither (train it with the op-by-op step)")
        self.thinker, self.recompute = thinker, recompute
        self.act = thinker.config.text_config.hidden_act
        decoder = [p for layer in thinker.model.layers for p in layer_parts(layer, self.act)[2]]
        self.encoder_params = [p for name, layer in lora_layers(thinker) if name.startswith(ENCODERS)
                               for p in (layer.lora_A.weight, layer.lora_B.weight)]
        where = {id(p): i for i, p in enumerate(decoder + self.encoder_params)}
        strangers = [p.name for p in params if id(p) not in where]
        if strangers:
            raise ValueError(f"the compiled step computes gradients of adapters only, not of {strangers[0]}")
        self.order = [where[id(p)] for p in params]

        def loss(hidden, rows, targets, weights):
            hidden = thinker.model.norm(hidden)
            b, t, h = hidden.shape
            picked = ops.gather(hidden.reshape(b * t, h), rows, 0)
            log_probs = ops.log_softmax(thinker.lm_head(picked).astype(ms.float32), -1)
            chosen = ops.gather_elements(log_probs, 1, targets.reshape(-1, 1)).reshape(-1)
            return -(chosen * weights).sum()

        self._head = ms.jit(ms.value_and_grad(loss, grad_position=0))

    def __call__(self, batch, scale=1.0):
        prepared, encoders_backward = self._prepare(batch)
        embeds, positions, valid, rows, targets, weights = self._inputs(prepared, batch["labels"], scale)
        model = self.thinker.model
        cos, sin = model.rotary_emb(positions, embeds.dtype)
        mask = causal_mask(valid, embeds.shape[1])
        layers = [layer_parts(layer, self.act) for layer in model.layers]  # weights bound afresh: never stale
        kept, x = [], embeds
        for kind, layer_weights, _ in layers:
            x_in = x
            x, saved = layer_graphs(kind)[0](x_in, cos, sin, mask, layer_weights)
            kept.append((x_in,) if self.recompute else (x_in,) + tuple(saved))
        loss, grad = self._head(x, rows, targets, weights)
        grads = []
        for (kind, layer_weights, _), inputs in zip(reversed(layers), reversed(kept)):
            _, backward, recomputing_backward = layer_graphs(kind)
            step = recomputing_backward if self.recompute else backward
            grad, layer_grads = step(*inputs, grad, cos, sin, mask, layer_weights)
            grads[:0] = layer_grads
        if encoders_backward is not None:  # the embeddings' gradient, without the right padding
            grads += list(encoders_backward(grad[:, :prepared.inputs_embeds.shape[1]])[1])
        return loss, tuple(grads[i] for i in self.order)

    def _prepare(self, batch):
        """The Thinker's prepared inputs, and with encoder adapters the backward of the embeddings
        (for their gradient) to the adapters."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if not self.encoder_params:
            return self.thinker.prepare_inputs(**inputs), None
        prepared = None

        def embeddings(_):
            # nonlocal, not appended to a list: MindSpore 2.7.1's vjp then returned zero gradients
            nonlocal prepared
            prepared = self.thinker.prepare_inputs(**inputs)
            return prepared.inputs_embeds

        _, backward = ms.vjp(embeddings, Tensor(0.0, ms.float32), weights=self.encoder_params)
        return prepared, backward

    @staticmethod
    def _inputs(prepared, labels, scale):
        embeds, positions, valid = prepared.inputs_embeds, prepared.position_ids, prepared.attention_mask
        b, t, _ = embeds.shape
        width = bucket(t, 64)
        if width > t:  # right padding: invalid, and after every real token, so never attended
            embeds = ops.cat((embeds, ops.zeros((b, width - t, embeds.shape[2]), embeds.dtype)), 1)
            positions = np.concatenate([positions, np.zeros((3, b, width - t), positions.dtype)], -1)
            valid = np.concatenate([valid, np.zeros((b, width - t), valid.dtype)], 1)
        rows, targets = labelled_positions(labels, width)
        count = bucket(len(rows), 16)
        weights = np.zeros(count, np.float32)
        weights[:len(rows)] = scale
        return (embeds, Tensor(positions, ms.int32), Tensor(valid, ms.int32),
                Tensor(np.pad(rows, (0, count - len(rows))).astype(np.int32)),
                Tensor(np.pad(targets, (0, count - len(rows))).astype(np.int32)), Tensor(weights))
