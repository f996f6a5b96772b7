"""CPU kernels of this package written in C++, compiled on first use and run by MindSpore as AOT
custom ops (`ops.Custom(..., func_type="aot")`), inside compiled graphs and op by op alike.

Why: MindSpore's CPU runtime costs ~20 us a kernel and its element-wise kernels each read and
write their whole input, so a chain of small element-wise steps over a large tensor is slow where
one loop over it is fast (README: "Latency"). Only the CPU target uses them; on Ascend the same
code runs as MindSpore ops.

A kernel's library is built with the C++ compiler found ($CXX, else `c++` or `g++` on the PATH),
with portable flags (no -march=native: a home folder may be shared by hosts of different CPUs),
into the stored graphs' folder (utils/graph_cache.py), so that a stored graph, which names the
library by its path, finds it in a later process. The file name holds a hash of the source, the
compiler and its flags: a changed kernel (or header beside it) is a new file, never a stale one. Written under a
temporary name and renamed, as the graphs are. With storing off, or a folder that cannot be
written, the library goes to a temporary folder of this process.

$MINDONE_EXT_NATIVE_KERNELS=off turns them off; without a compiler, or when compiling fails, a
warning says so once and the MindSpore ops run instead (same results, slower).
"""
import atexit
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache

from ..nn.device import on_ascend
from .atomic_file import written_atomically
from .graph_cache import cache_folder

ENV = "MINDONE_EXT_NATIVE_KERNELS"
# -fopenmp-simd: the marked loops; -fno-trapping-math: loops with a comparison (a clamp) vectorise
# (no kernel relies on floating-point traps; results are the same)
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++14", "-pthread", "-fopenmp-simd", "-fno-trapping-math")


def source(name):
    """The path of the kernel source `name` (mindone_ext/kernels/, shipped with the package)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", name)


def enabled():
    """Whether native kernels may be used: the CPU target, not turned off."""
    return not on_ascend() and os.environ.get(ENV, "").lower() not in ("off", "0", "false", "no")


def compiler():
    """The C++ compiler to build with, or None."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def library(source, links=()):
    """The path of `source` (a .cc file) built as a shared library, built if need be; None when
    native kernels are off or it cannot be built (warned once per source and reason). `links`:
    the linker's arguments for the libraries it calls (part of what the file is built from)."""
    if not enabled():
        return None
    cxx = compiler()
    if cxx is None:
        _warn_once(f"no C++ compiler found (set CXX or install g++): {os.path.basename(source)} runs as "
                   f"MindSpore ops, which is slower; {ENV}=off silences this")
        return None
    return _build(source, _code(source), cxx, cache_folder(), tuple(links))


def _code(source):
    """What the library is built from: `source` and the headers beside it (kernels share them)."""
    folder = os.path.dirname(source)
    parts = [source] + sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".h"))
    code = b""
    for path in parts:
        with open(path, "rb") as f:
            code += os.path.basename(path).encode() + b"\0" + f.read() + b"\0"
    return code


@lru_cache(maxsize=None)
def _build(source, code, cxx, folder, links=()):
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, timeout=60).stdout
    except OSError as error:
        _warn_once(f"the C++ compiler {cxx} does not run ({error}): {os.path.basename(source)} runs as MindSpore ops")
        return None
    flags = " ".join(FLAGS + links).encode()
    digest = hashlib.sha256(b"\0".join([code, cxx.encode(), flags, version])).hexdigest()[:16]
    name = f"{os.path.splitext(os.path.basename(source))[0]}-{digest}.so"
    for place in ([os.path.join(folder, "kernels")] if folder else []) + [None]:
        try:
            target = os.path.join(place or _process_folder(), name)
            if not os.path.exists(target):
                _compile(cxx, source, target, links)
            return target
        except OSError:
            continue  # a folder that cannot be written: this process's temporary one
        except subprocess.CalledProcessError as error:
            message = error.stderr.decode(errors="replace").strip().splitlines()[-3:]
            _warn_once(f"{os.path.basename(source)} did not compile with {cxx} ({' / '.join(message)}): "
                       "it runs as MindSpore ops, which is slower")
            return None
    return None


def _compile(cxx, source, target, links=()):
    with written_atomically(target) as temporary:
        subprocess.run([cxx, *FLAGS, source, "-o", temporary, *links], check=True, capture_output=True, timeout=600)


@lru_cache(maxsize=1)
def _process_folder():
    folder = tempfile.mkdtemp(prefix="mindone_ext-kernels-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


@lru_cache(maxsize=None)
def _warn_once(message):
    warnings.warn(message)


@lru_cache(maxsize=None)
def custom_op(path, function, out_shape=None, out_dtype=None):
    """The AOT custom op of `function` in the library at `path`, or None when there is no library
    (`library` gave None: the caller runs MindSpore ops). Its output has its first input's shape
    and dtype, or those `out_shape` and `out_dtype` give for the inputs' (lists of them for
    several outputs)."""
    if path is None:
        return None
    from mindspore import ops

    return ops.Custom(f"{path}:{function}", out_shape=out_shape or _first_shape, out_dtype=out_dtype or _first_dtype,
                      func_type="aot")


def _first_shape(first, *_):
    return first


def _first_dtype(first, *_):
    return first
