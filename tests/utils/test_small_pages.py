"""Media reading and patching run with numpy's huge-page advice off (utils/small_pages.py), and
leave it as they found it: after nested calls, calls overlapping in threads, and failures; a
user's NUMPY_MADVISE_HUGEPAGE decides instead."""
import threading

import numpy as np
import pytest

from mindone_ext.models.qwen2_5_omni import mm_info, processing
from mindone_ext.utils.small_pages import multiarray, on_small_pages


@pytest.fixture(autouse=True)
def advice_on(monkeypatch):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    before = multiarray._set_madvise_hugepage(True)
    yield
    multiarray._set_madvise_hugepage(before)


def test_the_video_reader_and_the_processor_make_their_arrays_without_huge_pages(monkeypatch):
    seen = []

    def recording(real):
        def resize(*args):
            seen.append(multiarray._get_madvise_hugepage())
            return real(*args)
        return resize

    monkeypatch.setattr(processing, "resize", recording(processing.resize))
    monkeypatch.setattr(mm_info, "resize_rounded", recording(mm_info.resize_rounded))
    frames = np.random.default_rng(0).integers(0, 256, (4, 50, 70, 3)).astype(np.uint8)
    videos, _ = mm_info.fetch_video(frames, {"video_fps": 2})
    processing.PatchPreprocessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)(frames[0])
    assert videos.shape[0] == 4 and seen and seen == [False] * len(seen)
    assert multiarray._get_madvise_hugepage() is True


def test_nested_threaded_and_failing_calls_restore_the_advice(monkeypatch):
    inside, release = threading.Event(), threading.Event()

    @on_small_pages
    def slow():
        inside.set()
        release.wait(10)
        return multiarray._get_madvise_hugepage()

    @on_small_pages
    def nested():
        return [multiarray._get_madvise_hugepage(), slow_inner()]

    @on_small_pages
    def slow_inner():
        return multiarray._get_madvise_hugepage()

    @on_small_pages
    def failing():
        raise ValueError("bad frame")

    results = []
    thread = threading.Thread(target=lambda: results.append(slow()))
    thread.start()
    assert inside.wait(10)
    assert nested() == [False, False]  # overlapping the thread's call, and ending first
    assert multiarray._get_madvise_hugepage() is False  # the thread's call still runs
    release.set()
    thread.join(10)
    assert results == [False] and multiarray._get_madvise_hugepage() is True
    with pytest.raises(ValueError, match="bad frame"):
        failing()
    assert multiarray._get_madvise_hugepage() is True
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")  # the user's choice stands
    assert slow_inner() is True
