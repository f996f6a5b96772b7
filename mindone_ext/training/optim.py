"""The optimizer side of a training step: AdamW, the learning rate schedule, gradient clipping
and loss scaling for float16.

Each follows PyTorch's definition (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_,
transformers' cosine schedule with warmup, torch.amp.GradScaler), written with
MindSpore ops that run on the CPU as well as on Ascend (`mint.optim.AdamW` has no CPU kernel).
"""
import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops


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


class AdamW:
    """torch.optim.AdamW (bias-corrected moments, decoupled weight decay) over MindSpore parameters.
    The moments are float32 Parameters named after their parameter, so they save and load by name."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params = list(params)
        if not self.params:
            raise ValueError("AdamW got no parameters to train")
        self.lr, (self.beta1, self.beta2), self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.exp_avg = [Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"exp_avg.{p.name}",
                                  requires_grad=False) for p in self.params]
        self.exp_avg_sq = [Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"exp_avg_sq.{p.name}",
                                     requires_grad=False) for p in self.params]

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        self.step_count += 1
        bias1 = 1 - self.beta1 ** self.step_count
        bias2_sqrt = math.sqrt(1 - self.beta2 ** self.step_count)
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            g = g.astype(ms.float32)
            m.set_data(m + (g - m) * (1 - self.beta1))  # torch: exp_avg.lerp_(grad, 1 - beta1)
            v.set_data(v * self.beta2 + g * g * (1 - self.beta2))
            value = p.astype(ms.float32) * (1 - lr * self.weight_decay)
            value = value - (lr / bias1) * m / (ops.sqrt(v) / bias2_sqrt + self.eps)
            # written into the parameter's own memory: a compiled graph that reads the parameter
            # stays bound to that memory (set_data would give it a new buffer the graph never sees)
            ops.assign(p, value.astype(p.dtype))

    def state_dict(self):
        state = {m.name: m.asnumpy() for m in self.exp_avg + self.exp_avg_sq}
        return state, {"step_count": self.step_count}

    def load_state_dict(self, tensors, meta):
        missing = [m.name for m in self.exp_avg + self.exp_avg_sq if m.name not in tensors]
        if missing:
            raise ValueError(f"optimizer state lacks {len(missing)} moment(s), e.g. {missing[0]}")
        for m in self.exp_avg + self.exp_avg_sq:
            m.set_data(Tensor(np.asarray(tensors[m.name], np.float32)))
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
