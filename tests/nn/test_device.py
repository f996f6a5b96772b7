"""nn/device.py: MindSpore's kernel-pool threads pinned one to a core on the CPU target, seen from
a new process (pinning is once per process, and the process runs on two of this machine's cores,
so that its pool, at least two threads, has no core to spare for the caller); on a card, ops kept
in their dtype unless the user chose otherwise."""
import json
import os
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import pytest

from mindone_ext.nn import device
from mindone_ext.nn.device import EXACT_PRECISION, keep_dtypes_exact

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


class AscendPrecisionStandIn:
    """MindSpore's Ascend op-precision configuration (`AscendOpPrecisionConf`: a getter and an
    `is_..._configured` per setting) and its setters (`mindspore.device_context.ascend.op_precision`,
    here `.setters`), as MindSpore 2.7.1's source has them: each setting is stored once (the
    switches as "1"/"0"); setting it again to another value raises."""

    def __init__(self, **configured):
        self.values, self.set_by_us = {}, []
        for name in EXACT_PRECISION:
            setattr(self, name, lambda name=name: self.values.get(name, ""))
            setattr(self, f"is_{name}_configured", lambda name=name: name in self.values)
        self.setters = SimpleNamespace(**{name: partial(self._set, name) for name in EXACT_PRECISION})
        for name, value in configured.items():
            self._set(name, value, by_us=False)

    def _set(self, name, value, by_us=True):
        stored = ("1" if value else "0") if isinstance(value, bool) else value
        if name in self.values and self.values[name] != stored:
            raise RuntimeError(f"The '{name}' can not be set repeatedly.")
        self.values[name] = stored
        if by_us:
            self.set_by_us.append(name)


@pytest.mark.parametrize("chosen, legacy", [
    ({}, {}),
    ({"precision_mode": "allow_mix_precision"}, {}),  # through device_context: kept, the rest made exact
    ({"conv_allow_hf32": True}, {}),
    ({}, {"precision_mode": "force_fp16", "matmul_allow_hf32": True}),  # set_context(ascend_config=...)
], ids=["none chosen", "a mode chosen", "hf32 convolutions chosen", "chosen the older way"])
def test_on_ascend_ops_keep_their_dtype_unless_the_user_chose(chosen, legacy, monkeypatch):
    """keep_dtypes_exact (called by from_pretrained and the doctor) sets on a card each precision
    setting the user left alone to keep ops in their dtype, keeps what the user set (either way
    MindSpore takes it), never sets one twice (MindSpore raises), and reports what is in effect."""
    conf = AscendPrecisionStandIn(**chosen)
    monkeypatch.setattr(device, "on_ascend", lambda: True)
    monkeypatch.setattr(device, "_ascend_precision", lambda: (conf, conf.setters, dict(legacy)))
    want = {**EXACT_PRECISION, **chosen, **legacy}
    assert keep_dtypes_exact() == want
    assert sorted(conf.set_by_us) == sorted(set(EXACT_PRECISION) - set(chosen) - set(legacy))
    assert keep_dtypes_exact() == want  # again (the doctor after from_pretrained): nothing changes or raises
    assert len(conf.set_by_us) == len(set(EXACT_PRECISION) - set(chosen) - set(legacy))


def test_off_ascend_nothing_is_set(monkeypatch):
    monkeypatch.setattr(device, "on_ascend", lambda: False)
    monkeypatch.setattr(device, "_ascend_precision", lambda: pytest.fail("read on a CPU"))
    assert keep_dtypes_exact() is None


def test_the_model_loader_makes_ops_exact_before_it_builds_a_model(monkeypatch, tmp_path):
    from mindone_ext.models.qwen2_5_omni import model

    calls = []
    monkeypatch.setattr(model, "keep_dtypes_exact", lambda: calls.append("precision"))
    monkeypatch.setattr(model, "CheckpointFolder", lambda path: calls.append("folder") or pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception):
        model.Qwen2_5OmniForConditionalGeneration.from_pretrained(str(tmp_path))
    assert calls == ["precision", "folder"]
