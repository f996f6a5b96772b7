"""Compiled graphs kept on disk: a graph compiles once per machine instead of once per process.

MindSpore 2.7.1's own compile cache files graphs by the order a process compiled them, so a
process that compiles in another order silently runs another graph (README: "Latency",
bench/compile_cache_probe.py). Here each graph is exported to MindIR under a key of everything
that decides it: a name and the constants the function closes over (its configuration), its
inputs' shapes and dtypes, this package's source, MindSpore's version and the device. A later
process loads it (`mindspore.load` + `nn.GraphCell`): ~2 s where compiling the vocoder takes ~20 s
on this project's CPU machine.

Only graphs that hold no parameters are stored (their weights are inputs), so a stored graph never
carries one checkpoint's weights into another process; a loaded graph holding any is refused.

The folder is $MINDONE_EXT_GRAPH_CACHE (default ~/.cache/mindone_ext/graphs); "off" turns storing
off (graphs then compile in each process, as `mindspore.jit`). It is safe to delete at any time.
A graph is written under a temporary name and renamed, so a killed or concurrent process never
leaves half a file under a key; a file that does not load is compiled again and replaced; a folder
that cannot be written (a read-only home) leaves graphs compiling in each process, with a warning.
"""
import contextlib
import hashlib
import os
import re
import warnings
from functools import lru_cache
from types import SimpleNamespace

import mindspore as ms
from mindspore import Tensor, nn

from ..nn import native_linear
from ..nn.device import pin_runtime_threads
from .atomic_file import written_atomically
from .interrupts import interrupts_held

ENV = "MINDONE_EXT_GRAPH_CACHE"
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache_folder():
    """The folder graphs are stored in, or None when storing is off."""
    return _folder_of(os.environ.get(ENV, ""))


@lru_cache(maxsize=8)
def _folder_of(setting):
    # asked at every graph call: the home folder is looked up once per setting, not per call
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    return setting or os.path.join(os.path.expanduser("~"), ".cache", "mindone_ext", "graphs")


@lru_cache(maxsize=1)
def source_hash():
    """sha256 of this package's source (Python, and the C++ of its native kernels): a changed line
    of code is a changed graph."""
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(PACKAGE):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith((".py", ".cc", ".h"))):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, PACKAGE).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def signature(value):
    """What a graph input contributes to its key: shape and dtype of a tensor, per element of a tuple."""
    if isinstance(value, Tensor):
        # the dtype itself, not its name: str() of a dtype took 0.9 us of 1.3 per tensor, at every
        # call of a decoder step that takes each weight (measured)
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(signature(v) for v in value)
    raise TypeError(f"a stored graph takes tensors or tuples of tensors, not {type(value).__name__}: "
                    "pass other values as the graph's constants")


def flat_function(function, counts):
    """`function` taking its tuples of tensors one tensor at a time: `counts` says, per input of
    `function`, n for a tuple of n tensors (rebuilt inside the graph) or None for an input passed
    as it is (a tensor; a tuple of tuples). A loaded graph's call costs ~45 us per tensor inside a
    tuple against ~8 us per positional one (measured with 300 weights: 14 ms against 2.4 ms)."""

    def flat(*inputs):
        grouped, i = (), 0
        for count in counts:
            if count is None:
                grouped, i = grouped + (inputs[i],), i + 1
            else:
                grouped, i = grouped + (inputs[i:i + count],), i + count
        return function(*grouped)

    return flat


def flatten(inputs):
    """(`inputs` with their tuples of tensors spread out, counts for flat_function)."""
    spread, counts = [], []
    for value in inputs:
        if isinstance(value, (tuple, list)) and all(isinstance(v, Tensor) for v in value):
            spread += value
            counts.append(len(value))
        else:
            spread.append(value)
            counts.append(None)
    return spread, tuple(counts)


class StoredGraph:
    """`function` (tensors, or tuples of tensors, in; tensors out; no parameters inside) compiled
    once per input signature and machine. `constants`: a repr-able value naming what the function
    closes over (e.g. its model's configuration). Parameters may be given as inputs (a KV cache
    the graph writes in place: Parameters are written without a copy)."""

    held = 0  # graphs compiled or loaded in this process, by every StoredGraph (the server's /health)

    def __init__(self, name, function, constants):
        self.name, self.function, self.constants = name, function, constants
        self._jits = {}  # counts -> the function compiled in this process (storing off)
        self._cells = {}  # (folder, signature) -> the loaded graph, or None: compiled in this process

    def __call__(self, *inputs):
        folder = cache_folder()
        spread, counts = flatten(inputs)
        # found by folder and signature: the key's sha256 is computed once per graph, not per call
        found = (folder, signature(inputs))
        if found in self._cells:
            return self._run(self._cells[found], counts, spread)
        with interrupts_held():  # a first call compiles (and stores): a Ctrl-C waits for it
            pin_runtime_threads()
            self._cells[found] = None if folder is None else self._load(folder, self.key(inputs), spread, counts)
            StoredGraph.held += 1
            return self._run(self._cells[found], counts, spread)

    def _run(self, cell, counts, spread):
        return self._jit(counts)(*spread) if cell is None else cell(*spread)

    def _jit(self, counts):
        if counts not in self._jits:
            self._jits[counts] = ms.jit(flat_function(self.function, counts))
        return self._jits[counts]

    def key(self, inputs):
        parts = (self.name, repr(self.constants), repr(signature(inputs)), source_hash(), ms.__version__,
                 ms.get_context("device_target"), repr(native_linear.library()))
        return f"{self.name}-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def _load(self, folder, key, spread, counts):
        """The stored graph of `key`, stored first if need be; None (compile in this process) when
        the folder cannot be written."""
        path = os.path.join(folder, key + ".mindir")
        if os.path.exists(path):
            try:
                return self._graph_cell(path)
            except (RuntimeError, ValueError, OSError):
                pass  # unreadable (e.g. a disk filled up while it was written): compiled again below
        with contextlib.ExitStack() as stack:
            try:
                temporary = stack.enter_context(written_atomically(path, ".partial.mindir"))
            except OSError as error:
                warnings.warn(f"graphs are not stored ({error}); set {ENV} to a writable folder, or to off")
                return None
            try:
                with without_full_collections():
                    ms.export(Exported(flat_function(self.function, counts)), *spread, file_name=temporary,
                              file_format="MINDIR")
            except ValueError as error:
                # export takes no Parameter but its Cell's own: one the function closes over is named
                named = re.search(r"parameter name is: (\S+?)\.?$", str(error), re.MULTILINE)
                if named is None:
                    raise
                raise self._holds_parameters(named.group(1)) from None
            cell = self._graph_cell(temporary)
        return cell

    def _graph_cell(self, path):
        cell = nn.GraphCell(ms.load(path))
        if len(cell.parameters_dict()):
            raise self._holds_parameters(", ".join(cell.parameters_dict()))
        return LoadedGraph(cell)

    def _holds_parameters(self, which):
        return ValueError(f"the graph {self.name} holds parameters ({which}): a stored graph must take its weights "
                          "as inputs")


class Exported(nn.Cell):
    """`function` as the Cell mindspore.export is given. Given a function, export wraps each
    Parameter input in a new Parameter holding a copy of its data, and a Parameter is a reference
    cycle (its ParamInfo points back at it): the copies outlived the export until a full
    collection, and a process exporting a 7B-shaped Talker's graphs one after another held a copy
    of its weights per graph until it was killed at 24 GB. A Cell's export copies nothing: that
    bench's warm-up, exporting every graph, now peaks at 11.5 GB (its model 9.7 GB), and exporting
    the Talker's 128-token step takes 2.7 s where copying its weights made it 14.6 s (measured)."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def construct(self, *inputs):
        return self.function(*inputs)


class LoadedGraph:
    """A loaded graph (GraphCell) called for one input signature: after its first call, later ones
    go straight to the compiled graph. GraphCell's call checks, every time, whether the arguments
    need another compile: a key over every input (~300 for a decoder step) that took nearly half a
    tiny model's decode step (100 tokens: 0.73 s, 0.52 s without). With one input signature per
    LoadedGraph, what the check can still tell apart is which Parameters are given (its key holds
    their identities: another pool's buffers make another phase), so calls with the same Parameters
    reuse the phase it compiled for them; other calls, and a MindSpore without the executor this
    relies on, take GraphCell's own way."""

    def __init__(self, cell):
        self.cell, self.phases = cell, {}  # ids of the Parameter inputs -> the compiled phase

    def __call__(self, *inputs):
        bound = tuple(id(x) for x in inputs if isinstance(x, ms.Parameter))
        phase = self.phases.get(bound)
        if phase is None or _executor is None:
            with without_full_collections(), interrupts_held():  # compiles for these Parameters
                out = self.cell(*inputs)
            self.phases[bound] = getattr(self.cell, "compile_phase", None)
            return out
        return _as_tensors(_executor(inputs, phase))


try:  # MindSpore's graph executor, as GraphCell's call ends up in it (mindspore/common/api.py)
    from mindspore.common.api import _cell_graph_executor, _convert_python_data as _as_tensors

    _executor = _cell_graph_executor._graph_executor
except (ImportError, AttributeError):
    _executor = None


@contextlib.contextmanager
def without_full_collections():
    """MindSpore compiles a Cell's graph (a loaded one's first call, an export) after a full
    `gc.collect()` (mindspore/common/api.py): in a process holding a model, 0.2-0.3 s a graph, 3.0 s
    of a 7.9 s cold answer on the tiny checkpoint (11 graphs; measured). Here that one call does
    nothing; Python's own collector still runs as usual."""
    api = getattr(ms.common, "api", None)
    real = getattr(api, "gc", None)
    if real is None:
        yield
        return
    api.gc = _NO_COLLECTION
    try:
        yield
    finally:
        api.gc = real


_NO_COLLECTION = SimpleNamespace(collect=lambda *generation: 0)
