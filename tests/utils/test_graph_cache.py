"""Graphs stored on disk (utils/graph_cache.py): a new process loads what another compiled, in any
order (where MindSpore 2.7.1's own cache returns another graph's results), keys that tell graphs
apart, and the ways a stored graph can be wrong refused or repaired."""
import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindone_ext.utils import graph_cache
from mindone_ext.utils.graph_cache import ENV, StoredGraph
from tests.conftest import INTERRUPTING_KNOB

CHILD = """
import json, sys
import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindone_ext.utils.graph_cache import StoredGraph

def scale_add(x, w):
    return x * w[0] + w[1]

def minus(x, w):
    return x - w[0]

graphs = {"f": StoredGraph("f", scale_add, ()), "g": StoredGraph("g", minus, ())}
x = Tensor(np.arange(3, dtype=np.float32))
w = ms.mutable((Tensor(np.float32(2)), Tensor(np.float32(5))))
print(json.dumps({name: graphs[name](x, w).asnumpy().tolist() for name in sys.argv[1]}))
"""
EXPECTED = {"f": [5.0, 7.0, 9.0], "g": [-2.0, -1.0, 0.0]}


def stored(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def test_a_new_process_loads_the_stored_graphs_in_any_order(tmp_path):
    child, folder = tmp_path / "child.py", tmp_path / "graphs"
    child.write_text(CHILD)  # a file: MindSpore reads a compiled function's source back
    env = dict(os.environ, **{ENV: str(folder)})
    runs = []
    for order in ("fg", "gf"):
        out = subprocess.run([sys.executable, str(child), order], env=env, capture_output=True, text=True, check=True)
        runs.append((json.loads(out.stdout.strip().splitlines()[-1]), stored(folder)))
    for got, _ in runs:
        assert got == EXPECTED
    first_files, second_files = runs[0][1], runs[1][1]
    assert len(first_files) == 2 and all(name.endswith(".mindir") for name in first_files)
    assert second_files == first_files  # the second process loaded both, wrote nothing


def test_keys_tell_apart_what_decides_a_graph(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path))
    graph = StoredGraph("f", lambda x: x, (1, 2))
    x = Tensor(np.zeros((2, 3), np.float32))
    key = graph.key((x,))
    assert key == graph.key((Tensor(np.ones((2, 3), np.float32)),))  # values do not matter
    assert key != graph.key((Tensor(np.zeros((3, 2), np.float32)),))
    assert key != graph.key((Tensor(np.zeros((2, 3), np.float16)),))
    assert key != graph.key(((x,),))
    assert key != StoredGraph("f", lambda x: x, (1, 3)).key((x,))
    assert key != StoredGraph("g", lambda x: x, (1, 2)).key((x,))
    with pytest.raises(TypeError, match="constants"):
        graph.key((x, 3))


def test_a_graph_holding_parameters_is_refused_and_nothing_is_left(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path))
    weight = Parameter(Tensor(np.ones(3, np.float32)), name="weight")

    def holds_a_parameter(x):
        return x * weight

    with pytest.raises(ValueError, match="holds parameters .*weight.*inputs"):
        StoredGraph("held", holds_a_parameter, ())(Tensor(np.ones(3, np.float32)))
    assert os.listdir(tmp_path) == []


def add_one(x):
    return x + 1


def test_an_unreadable_stored_graph_is_compiled_again(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path))
    x = Tensor(np.arange(4, dtype=np.float32))
    graph = StoredGraph("plus", add_one, ())
    path = tmp_path / (graph.key((x,)) + ".mindir")
    path.write_bytes(b"half a graph")
    assert StoredGraph("plus", add_one, ())(x).asnumpy().tolist() == [1, 2, 3, 4]
    assert path.stat().st_size > len(b"half a graph")
    assert StoredGraph("plus", add_one, ())(x).asnumpy().tolist() == [1, 2, 3, 4]  # loads now
    assert os.listdir(tmp_path) == [path.name]


def test_off_compiles_in_the_process_and_writes_nothing(monkeypatch, tmp_path):
    folder = tmp_path / "graphs"
    monkeypatch.setenv(ENV, "off")
    assert graph_cache.cache_folder() is None
    assert StoredGraph("plus", add_one, ())(Tensor(np.zeros(2, np.float32))).asnumpy().tolist() == [1, 1]
    assert not folder.exists()


def test_a_folder_that_cannot_be_written_compiles_in_the_process(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(ENV, str(blocker / "graphs"))  # under a file: the folder cannot be made
    graph = StoredGraph("plus", add_one, ())
    with pytest.warns(UserWarning, match="graphs are not stored"):
        assert graph(Tensor(np.zeros(2, np.float32))).asnumpy().tolist() == [1, 1]
    assert graph(Tensor(np.ones(2, np.float32))).asnumpy().tolist() == [2, 2]  # warned once per graph and shape
    assert os.listdir(tmp_path) == ["a-file"]


@pytest.mark.parametrize("stored", [True, False])
def test_held_counts_each_graph_and_shape_once(monkeypatch, tmp_path, stored):
    """StoredGraph.held is what the voice server's /health reports as graphs: a shape met again,
    by the same StoredGraph, is no new graph; another shape or another StoredGraph is."""
    monkeypatch.setenv(ENV, str(tmp_path) if stored else "off")
    graph, before = StoredGraph("plus", add_one, ()), StoredGraph.held
    for shape in ((2,), (2,), (3,), (2,), (3,)):
        graph(Tensor(np.zeros(shape, np.float32)))
    assert StoredGraph.held - before == 2
    StoredGraph("plus", add_one, ())(Tensor(np.zeros(2, np.float32)))
    assert StoredGraph.held - before == 3


def write_rows(index, rows, buffers):
    done = index
    for buffer in buffers:
        done = ops.depend(done, ops.scatter_update(buffer, index, rows))
    return done


@pytest.mark.parametrize("stored", [True, False])
def test_parameters_given_as_inputs_are_written_in_place(monkeypatch, tmp_path, stored):
    """A KV cache's buffers are Parameters a step graph writes: written by the graph that
    compiled (and stored) and by the graph a later StoredGraph loads, as by one compiled in the
    process with storing off."""
    monkeypatch.setenv(ENV, str(tmp_path) if stored else "off")
    for row in (1, 2):  # the second: a new StoredGraph, which loads the stored file
        buffers = tuple(Parameter(Tensor(np.zeros((4, 3), np.float32)), name=f"b{i}") for i in range(2))
        StoredGraph("write", write_rows, ())(Tensor([row], ms.int32), Tensor(np.full((1, 3), row, np.float32)),
                                             buffers)
        want = np.zeros((4, 3), np.float32)
        want[row] = row
        for buffer in buffers:
            np.testing.assert_array_equal(buffer.asnumpy(), want)
    assert len(os.listdir(tmp_path)) == (1 if stored else 0)


def test_a_loaded_graph_checks_its_arguments_once_per_set_of_parameters(monkeypatch, tmp_path):
    """After the first call with a set of Parameter inputs, a loaded graph runs without GraphCell's
    per-call compile check (LoadedGraph); its outputs and in-place writes are the same, and other
    Parameters (another pool's buffers) go through the check again."""
    monkeypatch.setenv(ENV, str(tmp_path))
    checked = []
    graph_cell_call = nn.GraphCell.__call__
    monkeypatch.setattr(nn.GraphCell, "__call__", lambda cell, *a: checked.append(1) or graph_cell_call(cell, *a))

    def pool():
        return tuple(Parameter(Tensor(np.zeros((4, 3), np.float32)), name=f"b{i}") for i in range(2))

    graph, pools = StoredGraph("write", write_rows, ()), [pool(), pool()]
    want = [np.zeros((4, 3), np.float32) for _ in pools]
    for call, (p, row) in enumerate([(0, 1), (0, 2), (1, 3), (0, 0), (1, 2), (0, 3)]):
        value = 10 * call + 1
        out = graph(Tensor([row], ms.int32), Tensor(np.full((1, 3), value, np.float32)), pools[p])
        assert out.asnumpy().tolist() == [row]
        want[p][row] = value
        for buffers, expected in zip(pools, want):
            for buffer in buffers:
                np.testing.assert_array_equal(buffer.asnumpy(), expected)
    assert len(checked) == 2  # the first call with each pool


def test_storing_and_loading_skip_mindspores_full_collection(monkeypatch, tmp_path):
    """MindSpore runs gc.collect() before compiling a Cell's graph (0.2-0.3 s each in a process
    holding a model): storing and a loaded graph's first call skip it, and the module's gc is
    MindSpore's own again afterwards. (Storing off, `mindspore.jit` never collects.)"""
    import mindspore.common.api as api

    monkeypatch.setenv(ENV, str(tmp_path))
    collections = []
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or 0)
    for value in (1, 2):  # the second: a new StoredGraph, which loads the stored file
        x = Tensor(np.full(3, value, np.float32))
        assert StoredGraph("plus", add_one, ())(x).asnumpy().tolist() == [value + 1] * 3
    assert collections == [] and api.gc is gc
    nn.GraphCell(ms.load(str(next(tmp_path.iterdir()))))(x)  # without the shim, the same first call collects
    assert len(collections) == 1


def matmul_chain(x, weights):
    for w in weights:
        x = ops.matmul(x, w)
    return x


def three_matmuls(x, a, b, c):
    return matmul_chain(x, (a, b, c))


def parameters_alive():
    return sum(isinstance(o, Parameter) for o in gc.get_objects())


def test_storing_a_graph_copies_none_of_its_parameter_inputs(monkeypatch, tmp_path):
    """Given a function, mindspore.export copies each Parameter input into a new Parameter, a
    reference cycle that lived until a full collection: a process exporting a 7B-shaped Talker's
    graphs held a copy of its weights per graph (killed at 24 GB). Stored graphs are exported as a
    Cell, which copies nothing (the bare function's export, last, shows the copies this counts)."""
    monkeypatch.setenv(ENV, str(tmp_path))
    weights = tuple(Parameter(Tensor(np.eye(64, dtype=np.float32) * (i + 1)), name=f"copied_{i}") for i in range(3))
    x = Tensor(np.ones((2, 64), np.float32))
    gc.collect()
    gc.disable()
    try:
        before = parameters_alive()
        out = StoredGraph("export_copies", matmul_chain, ())(x, weights)
        left = parameters_alive() - before
        ms.export(ms.jit(three_matmuls), x, *weights, file_name=str(tmp_path / "bare"), file_format="MINDIR")
        left_by_the_function = parameters_alive() - before - left
    finally:
        gc.enable()
    assert out.asnumpy().tolist() == np.full((2, 64), 6.0).tolist()
    assert (left, left_by_the_function) == (0, len(weights))


def first_of_each(pairs, x):
    return pairs[0][0] + pairs[1][1] + x


@pytest.mark.parametrize("stored", [True, False])
def test_a_tuple_of_tuples_is_an_input_too(monkeypatch, tmp_path, stored):
    monkeypatch.setenv(ENV, str(tmp_path) if stored else "off")
    x, y = Tensor(np.ones(2, np.float32)), Tensor(np.full(2, 2, np.float32))
    pairs = ms.mutable(((x, y), (y, x)))
    assert StoredGraph("pairs", first_of_each, ())(pairs, y).asnumpy().tolist() == [4, 4]
    assert StoredGraph("pairs", first_of_each, ())(ms.mutable(((y, x), (y, y))), x).asnumpy().tolist() == [5, 5]


def test_the_vocoder_compiles_when_graphs_are_stored(monkeypatch):
    from types import SimpleNamespace

    from mindone_ext.models.qwen2_5_omni.bigvgan import Qwen2_5OmniToken2WavBigVGANModel
    from mindone_ext.models.qwen2_5_omni.vocoder import Vocoder

    bigvgan = Qwen2_5OmniToken2WavBigVGANModel(SimpleNamespace(
        mel_dim=8, upsample_initial_channel=8, upsample_rates=[2], upsample_kernel_sizes=[4],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1]]), ms.float32)
    monkeypatch.setenv(ENV, "off")
    assert Vocoder(bigvgan).compiled is False
    monkeypatch.delenv(ENV)
    assert Vocoder(bigvgan).compiled is True
    assert Vocoder(bigvgan, compiled=False).compiled is False


CTRL_C_WHILE_COMPILING = """
import os, signal, sys
import numpy as np
import mindspore as ms
from mindone_ext.utils.graph_cache import StoredGraph
signals = int(sys.argv[1])
""" + INTERRUPTING_KNOB + """
def twice(x):
    return x * knob.scale

graph, x = StoredGraph("twice", twice, ()), ms.Tensor(np.ones(3, np.float32))
try:
    print("returned", graph(x).asnumpy().tolist())
except KeyboardInterrupt:
    print("interrupted")
print("again", graph(x).asnumpy().tolist())
"""


@pytest.mark.parametrize("signals, store", [(1, True), (1, False), (2, True)], ids=["once", "once-store-off", "twice"])
def test_ctrl_c_while_a_graph_compiles_is_raised_after_it_and_the_next_call_runs(signals, store, tmp_path):
    """A library user's script (Python's own SIGINT handler): a Ctrl-C inside the compile, raised in
    the Python MindSpore's parser calls back, was swallowed (the call returned, no interrupt).
    Held, it is raised after the graph is compiled and stored whole, pressed once or twice; the
    next call runs."""
    script, work, folder = tmp_path / "compiling.py", tmp_path / "work", tmp_path / "graphs"
    script.write_text(CTRL_C_WHILE_COMPILING)  # MindSpore compiles from source files only
    work.mkdir()
    env = dict(os.environ, **{ENV: str(folder) if store else "off"})
    out = subprocess.run([sys.executable, str(script), str(signals)], capture_output=True, text=True, timeout=300,
                         cwd=work, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["interrupted", "again [2.0, 2.0, 2.0]"]
    if store:  # one graph, whole: the interrupt came after it was stored
        assert [name.endswith(".mindir") and "partial" not in name for name in os.listdir(folder)] == [True]
    assert "ERROR" not in out.stderr and "analyze_fail" not in out.stderr, out.stderr[-3000:]
    assert list(work.iterdir()) == []
