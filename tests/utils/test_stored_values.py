"""Values computed once per machine (utils/stored_values.py): read back bit for bit, computed again
when anything they depend on changes, a damaged file repaired, off with the graphs' switch, and a
folder that cannot be written costing only the storing."""
import os

import numpy as np
import pytest

from mindone_ext.utils.graph_cache import ENV
from mindone_ext.utils.stored_values import FOLDER, stored_value


class Counted:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_a_value_is_computed_once_and_again_only_when_its_inputs_change(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    inputs = np.arange(12, dtype=np.float32).reshape(3, 4)
    compute = Counted(np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32))
    first = stored_value("v", [inputs], "s", compute)
    np.testing.assert_array_equal(first, compute.value)
    assert compute.calls == 1 and len(os.listdir(tmp_path / FOLDER)) == 1
    again = stored_value("v", [inputs.copy()], "s", compute)  # other arrays, the same contents: read back
    assert compute.calls == 1 and again.dtype == first.dtype
    np.testing.assert_array_equal(again, first)
    changed = inputs.copy()
    changed[2, 3] += 1
    for args in (("v", [changed], "s"), ("v", [inputs], "t"), ("w", [inputs], "s"), ("v", [inputs.view(np.int32)], "s"),
                 ("v", [inputs.reshape(4, 3)], "s"), ("v", [inputs, inputs], "s")):
        calls = compute.calls
        stored_value(*args, compute)
        assert compute.calls == calls + 1, args
    assert len(os.listdir(tmp_path / FOLDER)) == 7


def test_a_damaged_file_is_computed_again_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    compute = Counted(np.arange(1000, dtype=np.float32))
    stored_value("v", [], (), compute)
    (path,) = (tmp_path / FOLDER).iterdir()
    path.write_bytes(path.read_bytes()[:100])  # cut short, as by a full disk
    np.testing.assert_array_equal(stored_value("v", [], (), compute), compute.value)
    assert compute.calls == 2
    np.testing.assert_array_equal(np.load(path), compute.value)  # replaced whole
    assert [p.name for p in (tmp_path / FOLDER).iterdir()] == [path.name]  # no temporary file left


def test_off_computes_every_time_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "off")
    monkeypatch.chdir(tmp_path)
    compute = Counted(np.ones(3))
    for _ in range(2):
        np.testing.assert_array_equal(stored_value("v", [], (), compute), np.ones(3))
    assert compute.calls == 2 and not os.listdir(tmp_path)


def test_a_folder_that_cannot_be_written_warns_and_still_answers(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(ENV, str(blocker))
    with pytest.warns(UserWarning, match="values are not stored"):
        value = stored_value("v", [], (), Counted(np.full(2, 7.0)))
    np.testing.assert_array_equal(value, np.full(2, 7.0))
