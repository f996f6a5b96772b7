"""The optimizer side of a training step: AdamW, the learning rate schedule, gradient clipping
and loss scaling for float16.

Each follows PyTorch's definition (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_,
transformers' cosine schedule with warmup, torch.amp.GradScaler), written with
MindSpore ops that run on the CPU as well as on Ascend (`mint.optim.AdamW` has no CPU kernel).
AdamW updates the parameters of each shape together, stacked, in one compiled graph per shape:
op by op, parameter by parameter, it took 4.9 s a step for the 336 adapters of a 0.5B model on
the CPU (as long as the step's forward and backward), and one graph over all of them took 34 s to
compile (~0.1 s per parameter).
"""
import math
from dataclasses import dataclass
from typing import List

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops


def cosine_with_warmup(step, warmup_steps, total_steps, min_ratio=0.0):
    """The learning rate multiplier at `step`: linear warmup from 0, then a half cosine down to
    `min_ratio` at `total_steps` (transformers' get_cosine_schedule_with_warmup when min_ratio=0)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def global_norm(grads):
    return float(ops.sqrt(sum(ops.square(g.astype(ms.float32)).sum() for g in grads)).asnumpy())


def clip_by_global_norm(grads, max_norm):
    """(clipped grads, norm before clipping), as torch.nn.utils.clip_grad_norm_."""
    norm = global_norm(grads)
    coef = min(1.0, max_norm / (norm + 1e-6))
    return (tuple(g * coef for g in grads) if coef < 1.0 else tuple(grads)), norm


@ms.jit
def _adamw(params, grads, exp_avg, exp_avg_sq, decay, step_size, bias2_sqrt, beta1, beta2, eps):
    """One AdamW step of stacked parameters: (new parameters, new moments)."""
    grads = grads.astype(ms.float32)
    exp_avg = exp_avg + (grads - exp_avg) * (1 - beta1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + grads * grads * (1 - beta2)
    value = params.astype(ms.float32) * decay - step_size * exp_avg / (ops.sqrt(exp_avg_sq) / bias2_sqrt + eps)
    return value.astype(params.dtype), exp_avg, exp_avg_sq


@dataclass
class _Moments:
    """The stacked moments of parameters of one shape, and those parameters' indices."""
    members: List[int]
    exp_avg: Tensor
    exp_avg_sq: Tensor


class AdamW:
    """torch.optim.AdamW (bias-corrected moments, decoupled weight decay) over MindSpore parameters.
    The moments are float32, saved and loaded under their parameter's name (`exp_avg.<name>`).
    Parameters are written in place: a compiled graph that reads a parameter stays bound to its
    memory (set_data would give it a new buffer the graph never sees)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params = list(params)
        if not self.params:
            raise ValueError("AdamW got no parameters to train")
        self.lr, (self.beta1, self.beta2), self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        by_shape = {}
        for i, p in enumerate(self.params):
            by_shape.setdefault((tuple(p.shape), p.dtype), []).append(i)
        self.groups = [_Moments(members, *(ops.zeros((len(members),) + shape, ms.float32) for _ in range(2)))
                       for (shape, _), members in by_shape.items()]

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        self.step_count += 1
        scalars = [Tensor(np.float32(x)) for x in (1 - lr * self.weight_decay, lr / (1 - self.beta1 ** self.step_count),
                                                   math.sqrt(1 - self.beta2 ** self.step_count))]
        for group in self.groups:
            values, group.exp_avg, group.exp_avg_sq = _adamw(
                ops.stack([self.params[i] for i in group.members]), ops.stack([grads[i] for i in group.members]),
                group.exp_avg, group.exp_avg_sq, *scalars, self.beta1, self.beta2, self.eps)
            for i, value in zip(group.members, ops.unstack(values)):
                ops.assign(self.params[i], value)

    def state_dict(self):
        state = {}
        for group in self.groups:
            for kind in ("exp_avg", "exp_avg_sq"):
                stacked = getattr(group, kind).asnumpy()
                state.update({f"{kind}.{self.params[i].name}": stacked[j] for j, i in enumerate(group.members)})
        return state, {"step_count": self.step_count}

    def load_state_dict(self, tensors, meta):
        names = [f"{kind}.{p.name}" for kind in ("exp_avg", "exp_avg_sq") for p in self.params]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"optimizer state lacks {len(missing)} moment(s), e.g. {missing[0]}")
        for group in self.groups:
            for kind in ("exp_avg", "exp_avg_sq"):
                setattr(group, kind, Tensor(np.stack([np.asarray(tensors[f"{kind}.{self.params[i].name}"], np.float32)
                                                      for i in group.members])))
        self.step_count = int(meta["step_count"])


class DynamicLossScale:
    """float16 training: the loss is multiplied by `scale` before the backward pass so small
    gradients do not flush to zero; a step whose gradients overflow is skipped and the scale
    halved; after `window` clean steps it doubles (torch.amp.GradScaler's policy)."""

    def __init__(self, scale=2.0 ** 16, window=2000):
        self.scale, self.window, self.clean_steps = scale, window, 0

    def unscale(self, grads):
        """(grads / scale, finite?)"""
        grads = tuple(g.astype(ms.float32) / self.scale for g in grads)
        finite = all(bool(ops.isfinite(g).all().asnumpy()) for g in grads)
        return grads, finite

    def update(self, finite):
        if not finite:
            self.scale, self.clean_steps = self.scale / 2, 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.window:
            self.scale, self.clean_steps = self.scale * 2, 0
