"""The native kernels' threads (kernels/parallel.h): a pool started once per process. Called at
once from several threads (the pool taken: a call starts its own threads), and in a forked child
(the parent's workers do not exist there: the child starts its own pool), a kernel gives what it
gives alone, bit for bit. The kernel is called through its C entry (ctypes releases the GIL, so
the calls overlap for real), the linear one: its two column slices are the pool's work."""
import ctypes
import os
import threading

import numpy as np
import pytest

from mindone_ext.nn import native_linear
from mindone_ext.nn.device import on_ascend

pytestmark = pytest.mark.skipif(on_ascend(), reason="the native kernels are the CPU target's")
ROWS, IN, OUT = 64, 256, 512  # two slices of 256 columns: both threads have work


@pytest.fixture(scope="module")
def linear():
    native_linear.enable()
    assert native_linear.KERNELS is not None, "this machine builds the native kernel (CI installs g++)"
    entry = ctypes.CDLL(native_linear.KERNELS.library).Linear
    entry.restype = ctypes.c_int

    def call(x, weight):
        out = np.empty((x.shape[0], weight.shape[0]), np.float32)
        arrays = (x, weight, out)
        shapes = [(ctypes.c_int64 * 2)(*a.shape) for a in arrays]
        status = entry(3, (ctypes.c_void_p * 3)(*(a.ctypes.data for a in arrays)), (ctypes.c_int * 3)(2, 2, 2),
                       (ctypes.POINTER(ctypes.c_int64) * 3)(*(ctypes.cast(s, ctypes.POINTER(ctypes.c_int64))
                                                              for s in shapes)),
                       (ctypes.c_char_p * 3)(b"float32", b"float32", b"float32"), None, None)
        assert status == 0
        return out

    return call


def problem(seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((ROWS, IN)).astype(np.float32), rng.standard_normal((OUT, IN)).astype(np.float32)


def test_calls_from_several_threads_at_once_equal_each_alone(linear):
    problems = [problem(seed) for seed in range(4)]
    alone = [linear(*p) for p in problems]
    for want, (x, weight) in zip(alone, problems):
        assert np.abs(want - x.astype(np.float64) @ weight.T.astype(np.float64)).max() <= 1e-3
    failures = []

    def caller(index):
        for _ in range(100):
            got = linear(*problems[index])
            if not np.array_equal(got, alone[index]):
                failures.append(index)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(problems))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a call never returned"
    assert not failures


def in_forked_child(check):
    """check() run in a forked child -> True, False, or None when it did not answer within a
    minute (a call waiting for threads that do not exist there never returns: the child is killed)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.write(write, b"1" if check() else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = []
    reader = threading.Thread(target=lambda: answer.append(os.read(read, 1)))
    reader.start()
    reader.join(timeout=60)
    if reader.is_alive():
        os.kill(child, 9)
    os.waitpid(child, 0)
    os.close(read)
    return {b"1": True, b"0": False}.get(answer[0]) if answer else None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_starts_its_own_pool(linear):
    x, weight = problem(7)
    want = linear(x, weight)  # the parent's pool exists from here on; the child's call must not wait for it
    assert in_forked_child(lambda: np.array_equal(linear(x, weight), want)), "the forked child's call hung or differed"


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2,
                    reason="Linux with two cores or more")
def test_a_caller_pinned_to_one_core_gets_workers_on_every_core(linear):
    """MindSpore's pool threads may be pinned to a core each (nn/device.py); a kernel they run must
    still spread over the process's cores: its pool's workers are allowed on all of them. In a
    forked child, whose pool the pinned thread's call starts."""
    x, weight = problem(8)
    want = linear(x, weight)

    def check():
        cores, before = os.sched_getaffinity(0), set(os.listdir("/proc/self/task"))
        same, caller_id = [], []

        def pinned_caller():
            os.sched_setaffinity(0, {min(cores)})  # this thread only
            caller_id.append(str(threading.get_native_id()))
            same.append(np.array_equal(linear(x, weight), want))

        caller = threading.Thread(target=pinned_caller)
        caller.start()
        caller.join()
        workers = set(os.listdir("/proc/self/task")) - before - set(caller_id)  # (it may not have exited yet)
        return same == [True] and bool(workers) and all(os.sched_getaffinity(int(tid)) == cores for tid in workers)

    assert in_forked_child(check), "the pinned caller's kernel had no workers on the process's cores, or differed"
