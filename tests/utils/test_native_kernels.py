"""Building the native CPU kernels (utils/native_kernels.py): where the library goes, that it is
built once and rebuilt when missing, and that every way it cannot be built leaves the model on
MindSpore's ops with one warning, never a half-written file. (That a built kernel runs, in graphs
and op by op: tests/models/qwen2_5_omni/test_native_model_kernels.py.)"""
import os
import warnings

import pytest

from mindone_ext.models.qwen2_5_omni.bigvgan import KERNEL_SOURCE
from mindone_ext.utils import native_kernels
from mindone_ext.utils.graph_cache import ENV as GRAPHS

ADD_ONE = """#include <cstdint>
extern "C" int AddOne(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                      void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  int64_t n = 1;
  for (int i = 0; i < ndims[0]; ++i) n *= shapes[0][i];
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] + 1.f;
  return 0;
}
"""


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A graph folder of this test's own, the builder's memory of earlier builds and warnings cleared."""
    monkeypatch.setenv(GRAPHS, str(tmp_path / "graphs"))
    monkeypatch.delenv(native_kernels.ENV, raising=False)
    monkeypatch.setattr(native_kernels, "on_ascend", lambda: False)
    native_kernels._build.cache_clear()
    native_kernels._warn_once.cache_clear()
    yield tmp_path
    native_kernels._build.cache_clear()
    native_kernels._warn_once.cache_clear()


def source(folder, text=ADD_ONE, name="add_one.cc"):
    path = folder / name
    path.write_text(text)
    return str(path)


def test_built_once_into_the_graph_folder(fresh):
    path = native_kernels.library(source(fresh))
    assert os.path.dirname(path) == str(fresh / "graphs" / "kernels")
    assert os.path.basename(path).startswith("add_one-") and path.endswith(".so")
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temporary file left
    built = os.stat(path).st_mtime_ns
    native_kernels._build.cache_clear()  # a new process: the file is found, not built again
    assert native_kernels.library(source(fresh)) == path and os.stat(path).st_mtime_ns == built


def test_a_changed_source_or_header_is_a_new_library_and_a_missing_one_is_built_again(fresh):
    first = native_kernels.library(source(fresh))
    changed = native_kernels.library(source(fresh, ADD_ONE.replace("1.f", "2.f")))
    assert changed != first and os.path.exists(first) and os.path.exists(changed)
    (fresh / "shared.h").write_text("// a header beside the kernels, which they may include\n")
    with_header = native_kernels.library(source(fresh))
    assert with_header not in (first, changed) and os.path.exists(with_header)
    os.remove(fresh / "shared.h")
    os.remove(first)  # the cache folder half cleaned: a stored graph names this path
    native_kernels._build.cache_clear()
    assert native_kernels.library(source(fresh)) == first and os.path.exists(first)


def test_off_and_on_ascend_use_no_library(fresh, monkeypatch):
    monkeypatch.setenv(native_kernels.ENV, "off")
    assert native_kernels.library(source(fresh)) is None
    monkeypatch.delenv(native_kernels.ENV)
    monkeypatch.setattr(native_kernels, "on_ascend", lambda: True)
    assert native_kernels.library(KERNEL_SOURCE) is None
    assert not (fresh / "graphs").exists()
    assert native_kernels.custom_op(None, "AntiAliasedSnake") is None  # no library: the caller's ops


def test_without_a_compiler_one_warning_and_no_library(fresh, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(fresh))  # no c++ nor g++ there
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler found") as caught:
        assert native_kernels.library(KERNEL_SOURCE) is None
        assert native_kernels.library(KERNEL_SOURCE) is None
    assert len(caught) == 1


def test_a_source_that_does_not_compile_warns_with_the_compilers_words(fresh):
    with pytest.warns(UserWarning, match="broken.cc did not compile .*error"):
        assert native_kernels.library(source(fresh, "this is not C++", "broken.cc")) is None
    assert not os.listdir(fresh / "graphs" / "kernels")  # nothing half-written left


def test_a_graph_folder_that_cannot_be_written_builds_in_a_folder_of_the_process(fresh, monkeypatch):
    (fresh / "a-file").write_text("")
    monkeypatch.setenv(GRAPHS, str(fresh / "a-file" / "graphs"))  # under a file: no folder can be made
    path = native_kernels.library(source(fresh))
    assert path.startswith(native_kernels._process_folder()) and os.path.exists(path)


def test_storing_off_builds_in_a_folder_of_the_process(fresh, monkeypatch):
    monkeypatch.setenv(GRAPHS, "off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = native_kernels.library(source(fresh))
    assert path.startswith(native_kernels._process_folder())
