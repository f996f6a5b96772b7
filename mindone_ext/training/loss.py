"""The causal language-model loss on labelled (assistant) tokens, as transformers computes it."""
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from .data import IGNORE_INDEX


def labelled_positions(labels, width=None):
    """Where the loss is taken, for labels (B, T): the flat indices of the positions that predict
    a labelled token, in hidden states of `width` positions per row (T by default), and the token
    each predicts. Position (r, c) predicts token (r, c + 1)."""
    labels = np.asarray(labels)
    t = labels.shape[1]
    targets = labels[:, 1:].reshape(-1)
    where = np.flatnonzero(targets != IGNORE_INDEX)
    if len(where) == 0:
        raise ValueError("a batch without any labelled (assistant) token")
    return (where // (t - 1)) * (width or t) + where % (t - 1), targets[where]


def causal_lm_loss_sum(thinker, batch):
    """Sum over labelled tokens of -log p(next token): the LM head runs only on positions whose next
    token has a label, so the (tokens x vocabulary) logits of the prompt are never built.
    Returns (loss sum, number of labelled tokens). Dividing by the count gives transformers'
    mean causal LM loss; dividing by the count of a whole accumulation window gives the loss of
    that window as one batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden, _ = thinker.hidden_states(**inputs)
    b, t, h = hidden.shape
    rows, targets = labelled_positions(batch["labels"])
    picked = ops.gather(hidden.reshape(b * t, h), Tensor(rows.astype(np.int32)), 0)
    logits = thinker.lm_head(picked).astype(ms.float32)
    log_probs = ops.log_softmax(logits, -1)
    chosen = ops.gather_elements(log_probs, 1, Tensor(targets.reshape(-1, 1).astype(np.int32)))
    return -chosen.sum(), len(rows)
