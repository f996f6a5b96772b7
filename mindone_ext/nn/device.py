"""The one place in the tree that asks which device MindSpore runs on.

`on_ascend()` is a compile-time constant inside `mindspore.jit` graphs (via `constexpr`), so
portable ops can branch on it at no run-time cost, in graph and PyNative mode alike.
"""
import os

import mindspore as ms
from mindspore.ops import constexpr

ASYNC_ENV = "MINDONE_EXT_CPU_ASYNC"


@constexpr
def on_ascend() -> bool:
    return ms.get_context("device_target") == "Ascend"


def storage_dtype(requested):
    """The dtype parameters are kept in for a requested dtype.

    bfloat16 matmul has no CPU kernel, so on CPU bf16 weights are rounded to bf16 and then
    kept (and computed) in float32; everything else is kept as requested.
    """
    if requested == ms.bfloat16 and not on_ascend():
        return ms.float32
    return requested


def prefer_synchronous_cpu_dispatch():
    """On CPU, run PyNative ops synchronously (`mindspore.runtime.launch_blocking()`), unless
    MINDONE_EXT_CPU_ASYNC=1.

    MindSpore's asynchronous op pipeline lets the host run ahead of the kernels, which is what an
    Ascend card needs; on a CPU the host and the kernels share the cores, and on this project's
    2-core machine the pipeline made op-by-op code 2.6-4.6x slower (BigVGAN on 48 mel frames:
    4.05 s asynchronous, 0.87 s synchronous; one spoken turn on the tiny checkpoint: 8.6 s, 6.1 s).
    It is a process-wide MindSpore setting: models set it when they are built."""
    if ms.get_context("device_target") == "CPU" and os.environ.get(ASYNC_ENV) != "1":
        from mindspore import runtime

        runtime.launch_blocking()


def dispatch_is_synchronous():
    from mindspore._c_expression import RuntimeConf  # MindSpore has no public getter for it

    return RuntimeConf.get_instance().is_launch_blocking()
