"""Data parallel training across processes started by `msrun`: which rank this process is, and
sums over all ranks (gradients, token counts, losses) through MindSpore's communication layer."""
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops


class DataParallel:
    def __init__(self, rank=0, size=1):
        self.rank, self.size = rank, size
        self._all_reduce = ops.AllReduce() if size > 1 else None

    @classmethod
    def single(cls):
        return cls()

    @classmethod
    def start(cls):
        """Join the process group msrun set up (HCCL on Ascend, the CPU backend elsewhere)."""
        from mindspore.communication import get_group_size, get_rank, init

        init()
        return cls(get_rank(), get_group_size())

    @property
    def is_main(self):
        return self.rank == 0

    def sum_scalar(self, value):
        if self.size == 1:
            return value
        return float(self._all_reduce(Tensor(np.float32(value))).asnumpy())

    def sum_grads(self, grads):
        if self.size == 1:
            return grads
        return tuple(self._all_reduce(g.astype(ms.float32)) for g in grads)

    def log(self, message):
        if self.is_main:
            print(message, flush=True)

    def progress(self, **kwargs):
        from tqdm import tqdm

        kwargs["disable"] = kwargs.get("disable", False) or not self.is_main
        return tqdm(unit="step", dynamic_ncols=True, **kwargs)
