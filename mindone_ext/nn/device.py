"""The one place in the tree that asks which device MindSpore runs on.

`on_ascend()` is a compile-time constant inside `mindspore.jit` graphs (via `constexpr`), so
portable ops can branch on it at no run-time cost, in graph and PyNative mode alike.
"""
import os
import re

import mindspore as ms
from mindspore.ops import constexpr

PIN_ENV = "MINDONE_EXT_PIN_THREADS"
POOL_THREAD = re.compile(r"(Actor|Kernel)Thread_(\d+)$")  # the names MindSpore gives its kernel pool's threads


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


# What float32 (and float16) must mean on a card for the exact path to be exact: MindSpore's default on
# the Atlas training series (the first Ascend 910) is "force_fp16", every op that has a float16
# form computing in float16, and CANN computes float32 convolutions in HF32 (a shorter mantissa, as a
# GPU's TF32) on the cards that have it (Atlas A2); a float32 matmul keeps float32 by default, set
# here too so that a changed default cannot move it.
EXACT_PRECISION = {"precision_mode": "must_keep_origin_dtype", "conv_allow_hf32": False, "matmul_allow_hf32": False}


def keep_dtypes_exact():
    """On Ascend, make each op compute in the dtype it is given (`EXACT_PRECISION`), for every
    setting the user has not chosen (through `mindspore.device_context.ascend.op_precision` or
    `set_context(ascend_config=...)`): a choice of theirs is kept, and MindSpore refuses a second
    setting anyway. Called by `from_pretrained` and the doctor before a model is built; MindSpore
    reads these when the card starts (its first op), so a script that runs ops before loading a
    model calls this first. Returns the settings in effect on Ascend (None elsewhere: a CPU's
    kernels compute in their dtype)."""
    if not on_ascend():
        return None
    conf, op_precision, chosen = _ascend_precision()
    for name, value in EXACT_PRECISION.items():
        if name not in chosen and not getattr(conf, f"is_{name}_configured")():
            getattr(op_precision, name)(value)
    return {name: _as_setting(name, chosen.get(name, getattr(conf, name)())) for name in EXACT_PRECISION}


def _as_setting(name, value):
    """A setting as `EXACT_PRECISION` writes it (the configuration keeps the HF32 switches as "1"/"0")."""
    return value if isinstance(EXACT_PRECISION[name], str) else value in (True, 1, "1")


def _ascend_precision():
    """MindSpore's Ascend op-precision configuration, the module that sets it, and the settings
    given through the older `set_context(ascend_config=...)` (which that configuration does not see)."""
    from mindspore._c_expression import AscendOpPrecisionConf
    from mindspore.device_context.ascend import op_precision

    return AscendOpPrecisionConf.get_instance(), op_precision, dict(ms.get_context("ascend_config") or {})


_pinned = None  # not decided yet; then whether the pool's threads were pinned


def pin_runtime_threads():
    """On the CPU target, give each thread of MindSpore's kernel pool a core of its own, once per
    process, when the pool has no core to spare for the thread that calls the graphs.

    A graph of at most 100 kernels (a DiT block, a decoder of few layers) runs on the calling
    thread, not on the pool's actor thread, when the pool has a single actor thread (MindSpore
    2.7.1's graph scheduler); the caller then spins (sched_yield) while the pool's threads run a
    parallel kernel's parts. With as many pool threads as cores, that spinning took the cores from
    the threads doing the work: a 7B-shaped DiT block's matmuls ran 1.6x slower than inside a graph
    of the whole DiT (profiler), and 0.7 s of each 1.1 s evaluation went to the OS kernel. Pinned,
    the caller can take time only from the one pool thread sharing its core. Measured on the
    2-core machine: a DiT evaluation of 72 frames 0.96 -> 0.75 s, 1024 frames 6.5 -> 5.3 s;
    BigVGAN op by op 12.8 -> 10.4 s (README: "Latency").

    Only MindSpore's own pool threads are pinned: the caller and any thread it starts keep their
    affinity. On only with MINDONE_EXT_PIN_THREADS=on, for a process that has the machine to
    itself: several processes that each pin their pools to the same cores cannot spread over the
    idle ones (the test suite's two workers and the voice servers they start ran ~1.5x longer).
    Never when the user set MindSpore's own core binding (mindspore.runtime.set_cpu_affinity).
    Returns whether the threads are pinned."""
    global _pinned
    if _pinned is not None:
        return _pinned
    if on_ascend() or not hasattr(os, "sched_setaffinity") or _user_binds_cores() or \
            os.environ.get(PIN_ENV, "").lower() not in ("on", "1", "true", "yes"):
        _pinned = False
        return False
    cpus = sorted(os.sched_getaffinity(0))
    pool = sorted((kind != "Actor", int(index), tid) for tid, kind, index in _pool_threads())
    if not pool:  # the pool starts with the first op run: decided at a later call
        return False
    _pinned = len(pool) >= len(cpus) > 1  # else a core is left for the caller: nothing to untangle
    if not _pinned:
        return False
    for i, (_, _, tid) in enumerate(pool):
        try:
            os.sched_setaffinity(tid, {cpus[i % len(cpus)]})
        except OSError:  # the thread ended, or the container forbids it: the thread stays as it was
            pass
    return True


def _pool_threads():
    """(thread id, Actor or Kernel, index) of each thread of MindSpore's kernel pool in this process."""
    found = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                match = POOL_THREAD.match(f.read().strip())
        except OSError:
            continue
        if match:
            found.append((int(tid), match.group(1), match.group(2)))
    return found


def _user_binds_cores():
    try:
        from mindspore._c_expression import RuntimeConf
        return RuntimeConf.get_instance().is_thread_bind_core_configured()
    except (ImportError, AttributeError):
        return False
