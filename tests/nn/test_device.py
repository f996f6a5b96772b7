"""MindSpore's kernel-pool threads pinned one to a core on the CPU target (nn/device.py), seen from
a new process: pinning is once per process, and the process runs on two of this machine's cores,
so that its pool (at least two threads) has no core to spare for the caller."""
import json
import os
import subprocess
import sys

import pytest

CHILD = """
import json, os, sys
os.sched_setaffinity(0, set(json.loads(sys.argv[1])))  # before MindSpore starts its threads
import numpy as np
from mindspore import Tensor
from mindone_ext.nn.device import _pool_threads, on_ascend
from mindone_ext.utils.graph_cache import StoredGraph


def twice(x):
    return x * 2


double = StoredGraph("double", twice, ())
for n in (1, 2):  # the pool starts with the first op; the first new signature after it decides
    double(Tensor(np.ones(n, np.float32))).asnumpy()
print(json.dumps(dict(ascend=on_ascend(), caller=sorted(os.sched_getaffinity(0)),
                      pool={f"{kind}{index}": sorted(os.sched_getaffinity(tid)) for tid, kind, index in _pool_threads()})))
"""


def run_child(tmp_path, cpus, **env):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, MINDONE_EXT_GRAPH_CACHE="off", **env)
    out = subprocess.run([sys.executable, str(script), json.dumps(cpus)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def two_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("pinning needs two cores to tell apart")
    return cpus[:2]


def test_each_pool_thread_gets_its_own_core_and_the_caller_keeps_its_own(tmp_path, two_cpus):
    seen = run_child(tmp_path, two_cpus, MINDONE_EXT_PIN_THREADS="on")
    assert seen["caller"] == two_cpus  # the caller, and threads it starts, are left alone
    if seen["ascend"]:  # kernels run on the card: nothing to untangle (the CPU pool may not even start)
        assert all(cpus == two_cpus for cpus in seen["pool"].values()), seen
        return
    assert len(seen["pool"]) >= 2, seen
    assert all(len(cpus) == 1 for cpus in seen["pool"].values()), seen
    per_core = [sum(cpus == [cpu] for cpus in seen["pool"].values()) for cpu in two_cpus]
    assert max(per_core) - min(per_core) <= 1, seen  # the cores taken in turn
    if "Actor1" not in seen["pool"]:  # one actor thread (a 2-core machine): it and the kernel thread
        assert seen["pool"]["Actor0"] != seen["pool"]["Kernel0"], seen  # that splits kernels with it


def test_by_default_the_pool_threads_stay_on_every_core(tmp_path, two_cpus):
    seen = run_child(tmp_path, two_cpus, MINDONE_EXT_PIN_THREADS="")  # as if unset
    assert seen["pool"] or seen["ascend"], seen  # on the CPU the pool must be there to be looked at
    assert all(cpus == two_cpus for cpus in seen["pool"].values()), seen
