"""Large numpy arrays on ordinary pages while media is read and made into patches.

numpy asks the kernel for transparent huge pages (madvise) for every array of 4 MB or more. Where
the kernel's THP defrag setting is `madvise` (a common default) and memory is fragmented, as on a
machine that has been up a while, every first touch of such an array waits for the kernel to
compact memory: on the development machine, filling a fresh 2 GB array took 10.2 s so against
1.1 s without, and the processor made a 10-minute video's patches in 8.4-9.6 s against 1.6-1.7 s.
Frames and patches are written once and read once: huge pages gain them nothing. PyTorch does not
ask for huge pages either. A user's NUMPY_MADVISE_HUGEPAGE, when set, decides instead.
"""
import functools
import os
import threading

try:  # numpy 2 moved it; this project pins numpy 1 (requirements.txt), users' installs may differ
    from numpy._core import multiarray
except ImportError:
    from numpy.core import multiarray

_lock = threading.Lock()
_state = {"inside": 0, "before": True}


def on_small_pages(fn):
    """`fn` with numpy's huge-page advice off while it runs (in any thread), restored after the
    last such call ends."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
            return fn(*args, **kwargs)
        with _lock:
            if _state["inside"] == 0:
                _state["before"] = multiarray._set_madvise_hugepage(False)
            _state["inside"] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                _state["inside"] -= 1
                if _state["inside"] == 0:
                    multiarray._set_madvise_hugepage(_state["before"])
    return wrapper
