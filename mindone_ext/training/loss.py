"""The causal language-model loss on labelled (assistant) tokens, as transformers computes it."""
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from .data import IGNORE_INDEX


def causal_lm_loss_sum(thinker, batch):
    """Sum over labelled tokens of -log p(next token): the LM head runs only on positions whose next
    token has a label, so the (tokens x vocabulary) logits of the prompt are never built.
    Returns (loss sum, number of labelled tokens). Dividing by the count gives transformers'
    mean causal LM loss; dividing by the count of a whole accumulation window gives the loss of
    that window as one batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden, _ = thinker.hidden_states(**inputs)
    b, t, h = hidden.shape
    targets = np.asarray(batch["labels"])[:, 1:].reshape(-1)
    where = np.flatnonzero(targets != IGNORE_INDEX)
    if len(where) == 0:
        raise ValueError("a batch without any labelled (assistant) token")
    rows = (where // (t - 1)) * t + where % (t - 1)  # position predicting target (r, c + 1) is (r, c)
    picked = ops.gather(hidden.reshape(b * t, h), Tensor(rows.astype(np.int32)), 0)
    logits = thinker.lm_head(picked).astype(ms.float32)
    log_probs = ops.log_softmax(logits, -1)
    chosen = ops.gather_elements(log_probs, 1, Tensor(targets[where].reshape(-1, 1).astype(np.int32)))
    return -chosen.sum(), len(where)
