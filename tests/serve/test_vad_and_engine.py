"""The turn detector on synthetic speech, and the model thread's scheduling with plain generators
(no model): interleaving, the bounded queue, cancellation, errors."""
import asyncio
import threading
import time

import numpy as np
import pytest

from mindone_ext.serve.engine import BUSY_KINDS, Busy, Engine, Finished, Started
from mindone_ext.serve.vad import SpeechStarted, SpeechStopped, TurnDetector
from tests.serve.conftest import drain


def detect(pcm, piece):
    detector = TurnDetector()
    return [e for i in range(0, len(pcm), piece) for e in detector.push(pcm[i:i + piece])]


@pytest.mark.parametrize("piece", [960, 1234, 32000])  # one 30 ms frame; unaligned (odd sample counts too); 1 s
def test_a_spoken_turn_is_found_whole_whatever_the_piece_size(piece):
    from demo_media import speech_like

    speech = speech_like(1.0, 16000, seed=2)
    signal = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(16000, np.float32)])
    pcm = (signal * 32767).astype("<i2").tobytes()
    events = detect(pcm, piece)
    kinds = [type(e) for e in events]
    assert kinds[0] is SpeechStarted and kinds[-1] is SpeechStopped and kinds.count(SpeechStarted) == 1
    turn = np.concatenate([e.audio for e in events])
    samples = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
    # the turn is the input from some 30 ms frame on, unchanged
    start = next(i for i in range(0, len(samples), 480) if np.array_equal(samples[i:i + len(turn)], turn))
    assert start <= 8000 <= start + 0.4 * 16000  # the turn starts at most the pre-roll before the voice
    assert start + len(turn) >= 8000 + len(speech)  # and holds all of it
    assert not detect(bytes(64000), piece)  # silence is no turn


async def _scheduling():
    engine = Engine(max_active=2, max_queue=1)
    order = []

    def answer(name, n, fail_at=None):
        def start():
            for i in range(n):
                if i == fail_at:
                    raise ValueError(f"{name} broke")
                order.append(name)
                yield f"{name}{i}"
        return start

    try:
        a, b, c = engine.submit(answer("a", 3)), engine.submit(answer("b", 3)), engine.submit(answer("c", 2, 1))
        assert (a.position, b.position, c.position) == (0, 0, 1)
        with pytest.raises(Busy):
            engine.submit(answer("d", 1))
        got_a, got_b, got_c = await asyncio.gather(drain(a), drain(b), drain(c))
        assert got_a == [Started(), "a0", "a1", "a2", Finished()] and got_b[1:4] == ["b0", "b1", "b2"]
        assert order[:4] == ["a", "b", "a", "b"]  # one event each in turn
        assert got_c[:2] == [Started(), "c0"] and str(got_c[-1].error) == "c broke"
        assert await engine.call(lambda x: x + 1, 41) == 42
        with pytest.raises(ZeroDivisionError):
            await engine.call(lambda: 1 / 0)
        closed = []

        def endless():
            try:
                while True:
                    yield "x"
            finally:
                closed.append(True)
        e = engine.submit(endless)
        assert await e.events.get() == Started()
        await engine.cancel(e)
        assert closed == [True] and engine.load() == {"active": 0, "queued": 0}
    finally:
        engine.stop()


def test_engine_interleaves_bounds_its_queue_and_cancels():
    asyncio.run(_scheduling())


async def _busy_seconds():
    engine = Engine()

    def slow_answer():
        for i in range(3):
            time.sleep(0.1)
            yield i

    try:
        began = time.monotonic()
        await engine.call(time.sleep, 0.2)
        assert await drain(engine.submit(slow_answer)) == [Started(), 0, 1, 2, Finished()]
        busy, wall = dict(engine.busy_seconds), time.monotonic() - began
    finally:
        engine.stop()
    assert set(busy) == set(BUSY_KINDS)
    assert busy["calls"] >= 0.2 and busy["answers"] >= 0.3  # each under what it was
    assert busy["decode"] == busy["token2wav"] == busy["prefills"] == 0  # (the interleaved engine, no turns)
    assert sum(busy.values()) <= wall  # no second counted twice


def test_the_model_threads_time_is_counted_by_what_it_did():
    asyncio.run(_busy_seconds())


async def _stalls():
    engine = Engine()
    release = threading.Event()
    try:
        assert not engine.stalled(0.2)  # waiting for work is not a stall
        stuck = asyncio.ensure_future(engine.call(release.wait))
        await asyncio.sleep(0.5)
        assert engine.stalled(0.2) and not engine.stalled(60)  # one call past the limit
        release.set()
        assert await stuck is True
        await asyncio.sleep(0.1)
        assert not engine.stalled(0.2)
    finally:
        release.set()
        engine.stop()
    assert engine.stalled(60)  # the model thread is gone


def test_a_model_thread_stuck_in_one_call_or_gone_is_stalled():
    asyncio.run(_stalls())
