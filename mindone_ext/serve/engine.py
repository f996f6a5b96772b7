"""The one thread that touches the model.

MindSpore models are not safe to call from several threads, and on one machine there is one
model. Everything that runs it goes through this thread: short calls (opening a session,
prefilling a piece of audio) in the order they come, and generations. At most `max_active`
generations run at once; up to `max_queue` more wait their turn; beyond that `submit` raises
Busy. Events reach the asyncio side through each generation's queue.

A generation is an iterable of events, or an answer pipeline (models.qwen2_5_omni.answer.Answer)
that says which decode steps it needs next. The batched engine advances every active answer in
rounds: one compiled Thinker step and one compiled Talker step serve the round's answers together
(their caches are rows of the runners' pools), then Token2Wav makes the audio their new codec
tokens allow, windows of several answers solved and vocoded as batches; the interleaved engine
takes one event of each generation in turn, each running its own steps.

A conversation's turn (its text or audio prefilled into its cache) is a call too: those that
arrive together are advanced together, their pieces prefilled as one batched step and their audio
clips encoded in one call (`call_steps`). While answers are being made, turns prefill at most
PREFILL_BUDGET tokens between two rounds of their steps (a turn's parts are at most PREFILL_CHUNK
tokens each), so a long prompt does not stall the answers in progress; a new answer with a prompt
of its own (an HTTP request's) encodes its media in parts (models/qwen2_5_omni/media_parts.py, each
counted as the tokens it gives) and prefills its prompt the same way, among the turns, then joins
the rounds.

The first audio of a new answer comes first: while an answer has not been heard yet, the audio of
answers whose delivered speech is further ahead of their playback than two rounds waits (it
cannot run dry before its next turn), so the round ends sooner; what waited is then made in
larger batches.
"""
import asyncio
import collections
import contextlib
import ctypes
import logging
import threading
import time
import uuid
from dataclasses import dataclass

from ..generation.decode import PREFILL_CHUNK, STEP_TOKENS
from ..models.qwen2_5_omni.prefills import EncodeRequest
from ..models.qwen2_5_omni.streaming import AudioChunk
from ..models.qwen2_5_omni.token2wav_stream import synthesise


# turns' tokens prefilled between two rounds of answers (at least one pass): one batched step's worth
PREFILL_BUDGET = STEP_TOKENS
# what the model thread's time is counted under (Engine.busy_seconds, GET /health): short calls
# (opening a session, ...), prefills (turns' features; turns', answers' prompts and endings
# prefilled; media encoded), the batched engine's decode rounds (steps and the answers' work
# between them) and Token2Wav's batches, the interleaved engine's answers (each event of one
# answer: its steps and its speech together; with the batched engine, an answer's start)
BUSY_KINDS = ("calls", "prefills", "decode", "token2wav", "answers")
log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue of waiting generations is full."""


class Stopped(Exception):
    """The server is shutting down: the model thread takes no more work."""


@dataclass
class Started:
    """The generation left the queue and is running."""


@dataclass
class Finished:
    """The generation's last event was delivered."""


@dataclass
class Failed:
    error: BaseException


def error_id(log, what, error=None):
    """Log an unexpected error with its trace under a short id, and return the id: the client
    gets the id (to quote in a report), never the trace or server paths."""
    eid = uuid.uuid4().hex[:12]
    log.error("%s failed (error id %s)", what, eid, exc_info=error or True)
    return eid


class Generation:
    def __init__(self, start, loop):
        self.start = start  # called on the model thread when the generation's turn comes -> iterator of events
        self.loop = loop
        self.events = asyncio.Queue()
        self.iterator = None
        self.answer = None  # an answer pipeline the batched engine advances (then also `iterator`)
        self.joining = False  # the batched engine is prefilling its prompt (it joins the rounds after)
        self.done = False
        self.position = 0  # when submitted: 0 if it could start at once, else its place in the queue (1 = next)
        self.heard_from = None  # when its first audio was delivered (the engine's clock)
        self.audio_seconds = 0.0  # of audio delivered

    def lead(self, now):
        """Seconds of delivered audio not yet played, if playback began with the first chunk."""
        return self.audio_seconds - (now - self.heard_from)

    def deliver(self, event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, max_active=1, max_queue=8, batched=False, clock=time.monotonic, prefill_budget=PREFILL_BUDGET):
        """`clock`: the playback clock that first-audio priority compares delivered audio with;
        `prefill_budget`: turns' tokens prefilled between two rounds of answers (None: turns run to
        their end, however long the answers in progress wait)."""
        if max_active < 1 or max_queue < 0:
            raise ValueError(f"max_active must be >= 1 and max_queue >= 0, got {max_active} and {max_queue}")
        self.max_active, self.max_queue, self.batched = max_active, max_queue, batched
        self.prefill_budget = prefill_budget
        self.clock, self.round_seconds = clock, 0.0
        self.calls = collections.deque()
        self.prefilling = []  # turns part-way through their prefills: (generator, its next request, done)
        self.waiting = collections.deque()
        self.active = []
        self.wake = threading.Condition()
        self.stopping = False
        self.busy_since = None  # when the model thread began what it is doing (None: waiting for work)
        self.busy_seconds = dict.fromkeys(BUSY_KINDS, 0.0)  # its keys never change: read from any thread
        self._timing = False  # a block of the model thread is being counted (see _timed)
        self.thread = threading.Thread(target=self._run, name="model", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- asyncio side

    async def call(self, fn, *args):
        """Run fn(*args) on the model thread; its result (or exception) comes back here."""
        return await self._queue(fn, args, False)

    async def call_steps(self, fn, *args):
        """`call` for a function that returns a generator of prefills (decode.ExtendRequest, e.g.
        ConversationSession.feed_audio_steps) and media parts to encode (prefills.EncodeRequest),
        and is sent back each one's result: the calls waiting together run their prefills as one
        batched step per decoder, their clips as one call per encoder, between the rounds of the
        answers in progress (at most PREFILL_BUDGET tokens between two)."""
        return await self._queue(fn, args, True)

    async def _queue(self, fn, args, steps):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.wake:
            if self.stopping:
                raise Stopped("the server is shutting down")
            self.calls.append((fn, args, future, loop, steps))
            self.wake.notify()
        return await future

    def submit(self, start):
        """Queue a generation; `start()` is called on the model thread and returns its events'
        iterator. Raises Busy when `max_queue` generations are already waiting."""
        generation = Generation(start, asyncio.get_running_loop())
        with self.wake:
            if self.stopping:
                raise Stopped("the server is shutting down")
            ahead = len(self.active) + len(self.waiting)
            if ahead >= self.max_active + self.max_queue:
                raise Busy(f"{len(self.active)} answers are being generated and {len(self.waiting)} are waiting")
            generation.position = max(0, ahead - self.max_active + 1)
            self.waiting.append(generation)
            self.wake.notify()
        return generation

    async def cancel(self, generation):
        """Stop a generation (closing its iterator, on the model thread); returns when it is stopped,
        so what the caller runs next sees the generator's cleanup done."""
        await self.call(self._close, generation)

    def load(self):
        with self.wake:
            return {"active": len(self.active), "queued": len(self.waiting)}

    def stalled(self, seconds):
        """Whether the model thread is gone or has spent more than `seconds` in one call or round
        (asked without waiting for it: a load balancer's health check)."""
        since = self.busy_since
        return not self.thread.is_alive() or (since is not None and time.monotonic() - since > seconds)

    def stop(self, timeout=5.0):
        """Stop the model thread after its current step: waiting calls fail with Stopped, running
        and queued generations end with Failed(Stopped). Returns after at most `timeout` seconds
        (a step that takes longer is abandoned to the daemon thread)."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout)

    # ---------------------------------------------------------------- model thread

    def _run(self):
        worked = False
        while True:
            with self.wake:
                idle = not (self.calls or self.prefilling or self.waiting or self.active or self.stopping)
                if idle and not worked:
                    self.wake.wait()
                    continue
            if idle:
                # Freed caches and activations leave the C heap fragmented: RSS would creep up
                # with every conversation (~+100 MB per 12 answers here) though nothing leaks.
                trim_heap()
                worked = False
                continue
            worked = True
            with self.wake:
                if self.stopping:
                    calls, self.calls = list(self.calls), collections.deque()
                    break
                calls = list(self.calls)
                self.calls.clear()
                while self.waiting and len(self.active) < self.max_active:
                    self.active.append(self.waiting.popleft())
                running = list(self.active)
            together = [call[:4] for call in calls if call[4]]
            for fn, args, future, loop, steps in calls:
                if steps:
                    continue
                self.busy_since = time.monotonic()
                try:
                    with self._timed("calls"):
                        result, error = fn(*args), None
                except Exception as e:  # noqa: BLE001  (handed to the caller)
                    result, error = None, e
                loop.call_soon_threadsafe(_settle, future, result, error)
            if together:
                with self._timed("prefills"):
                    self._start_turns(together)
            if self.prefilling:
                # while answers are being made, a round's worth of prefill at most between two of
                # their steps: a long prompt does not stall them; with none, turns run to their end
                self.busy_since = time.monotonic()
                self._prefill_passes(self.prefilling, self.prefill_budget if running else None)
            self.busy_since, began = time.monotonic(), self.clock()
            try:
                self._round(running)
            except Exception as e:  # noqa: BLE001  (a bug of ours: fail this round's answers, keep the thread)
                for generation in running:
                    if not generation.done:
                        self._fail(generation, e)
            self.busy_since, self.round_seconds = None, self.clock() - began
        for _, _, future, loop, _ in calls:
            loop.call_soon_threadsafe(_settle, future, None, Stopped("the server is shutting down"))
        for steps, _, done in self.prefilling:
            steps.close()
            done(None, Stopped("the server is shutting down"))
        for generation in list(self.active) + list(self.waiting):
            try:
                self._close(generation)
            except Exception:  # noqa: BLE001  (a bug of ours: logged; the other generations are still told)
                log.exception("closing an answer while the engine stops")
            generation.deliver(Failed(Stopped("the server is shutting down")))

    def _round(self, running):
        together = []
        for generation in running:
            if generation.answer is not None and not generation.done:
                together.append(generation)
            elif not generation.joining:  # (an answer whose prompt is prefilling waits for it)
                with self._timed("answers"):
                    self._step(generation)
        if together:
            with self._timed("decode"):
                self._decode_together(together)
            with self._timed("token2wav"):
                self._synthesise_together(self._first_audio_first([g for g in together if not g.done
                                                                   and not g.answer.done and g.answer.wave is not None]))
            self._finish_together([g for g in together if not g.done and g.answer.done])

    @contextlib.contextmanager
    def _timed(self, kind):
        """Count the block's time under `kind`, unless it runs inside another counted block (an
        answer's prefill that ends it prefills its ending): each second is counted once."""
        if self._timing:
            yield
            return
        self._timing, began = True, time.perf_counter()
        try:
            yield
        finally:
            self._timing = False
            self.busy_seconds[kind] += time.perf_counter() - began

    def _start_turns(self, calls):
        """`call_steps` calls: each generator runs to its first request, which joins
        `self.prefilling`; its result (or exception) goes back to its caller at its end."""
        for fn, args, future, loop in calls:
            def settle(result, error, future=future, loop=loop):
                loop.call_soon_threadsafe(_settle, future, result, error)

            try:
                steps = fn(*args)
            except Exception as e:  # noqa: BLE001  (handed to the caller)
                settle(None, e)
                continue
            _advance(self.prefilling, steps, None, settle)

    def _run_together(self, generators):
        """(generator of requests, done(result, error)) pairs, advanced together to their ends
        (`_prefill_passes`); then each one's `done`."""
        waiting = []  # (generator, its request not yet run, done)
        for steps, done in generators:
            _advance(waiting, steps, None, done)
        self._prefill_passes(waiting)

    def _prefill_passes(self, waiting, budget=None):
        """Passes over `waiting` (generator, request, done) items: in a pass the prefills of one
        decoder run as one batch (`extend_requests`) and the media parts of one encoder as one call
        (`encode_clips`; a failed batch or call is thrown into each of its generators, whose turns
        rewind), the results go back, each generator runs to its next request. Until `waiting` is
        empty, or, with a `budget`, while the passes stay within that many tokens prefilled or
        encoded, a call counting at least PREFILL_CHUNK (a small call costs its overhead: 25 audio
        parts of 20 tokens had stalled answers 2x as long as 4 prefill parts of 128, measured); one
        pass at least, what is left waits in `waiting`. A cache takes at most one prefill per batch:
        another waits for the next (a conversation's calls come one at a time, so this only guards)."""
        with self._timed("prefills"):
            self._prefill_within(waiting, budget)

    def _prefill_within(self, waiting, budget):
        tokens = 0
        while waiting:
            batch, held, caches, clips, closed = {}, [], set(), {}, []
            for item in waiting:
                if isinstance(item[1], EncodeRequest):
                    clips.setdefault(item[1].encoder, []).append(item)
                    continue
                cache = item[1].cache
                if cache.released:  # its conversation closed while the turn waited: its rows may be another's
                    closed.append(item)
                elif id(cache) in caches:
                    held.append(item)
                else:
                    caches.add(id(cache))
                    batch.setdefault(cache.pool.runner, []).append(item)
            calls = [(encoder.encode_clips, [request.inputs for _, request, _ in items], items)
                     for encoder, items in clips.items()]
            calls += [(runner.extend_requests, [request for _, request, _ in items], items)
                      for runner, items in batch.items()]
            cost = sum(max(PREFILL_CHUNK, sum(request.tokens if isinstance(request, EncodeRequest)
                                              else request.embeds.shape[1] for _, request, _ in items))
                       for _, _, items in calls)
            if budget is not None and tokens and tokens + cost > budget:
                return
            tokens += cost
            waiting[:] = held
            for run, requests, items in calls:
                try:
                    results = run(requests)
                except Exception as e:  # noqa: BLE001  (a failed batch fails the turns in it, not the server)
                    results = [e] * len(items)
                for (steps, _, done), result in zip(items, results):
                    _advance(waiting, steps, result, done)
            for steps, _, done in closed:
                _advance(waiting, steps, ValueError("the conversation is closed"), done)

    def _finish_together(self, generations):
        """Answers that are done, closed together (a conversation keeping its answer prefills its
        end: one batch for all), then Finished, or Failed when keeping the answer failed."""
        def finished(generation):
            def done(_, error):
                generation.deliver(Finished() if error is None else Failed(error))
                self._retire(generation)
            return done

        self._run_together([(g.answer.close_steps(), finished(g)) for g in generations])

    def _first_audio_first(self, speaking):
        """The answers whose audio is made this round: all, unless one has not been heard yet;
        then those far enough ahead of their playback wait (see the module's docstring)."""
        if all(g.heard_from is not None for g in speaking):
            return speaking
        now = self.clock()
        return [g for g in speaking if g.heard_from is None or g.lead(now) <= 2 * self.round_seconds]

    def _decode_together(self, generations):
        """One round: every answer's next decode steps, those of one runner in one batched call."""
        wanted, groups = {}, {}
        for generation in generations:
            try:
                wanted[generation] = generation.answer.pending()
            except Exception as e:  # noqa: BLE001
                self._fail(generation, e)
                continue
            for request in wanted[generation]:
                groups.setdefault(request.loop.runner, []).append(request)
        results = {}
        for runner, requests in groups.items():
            try:
                outputs = runner.decode_requests(requests)
            except Exception as e:  # noqa: BLE001  (a failed step fails the answers in it, not the server)
                outputs = [e] * len(requests)
            results.update(zip(map(id, requests), outputs))
        for generation, requests in wanted.items():
            outputs = [results[id(r)] for r in requests]
            error = next((o for o in outputs if isinstance(o, Exception)), None)
            if error is not None:
                self._fail(generation, error)
                continue
            try:
                self._deliver(generation, generation.answer.advance(
                    [(r, logits, hidden) for r, (logits, hidden) in zip(requests, outputs)]))
                self._start_speech(generation)
            except Exception as e:  # noqa: BLE001
                self._fail(generation, e)

    def _start_speech(self, generation):
        """An answer's Talker prompt, once known, prefills among the turns' parts between rounds
        (Answer.speech_start_steps): a long conversation's does not stall the answers in progress."""
        def done(_, error):
            if error is not None and not generation.done:
                self._fail(generation, error)

        steps = generation.answer.speech_start_steps()
        if steps:
            _advance(self.prefilling, steps, None, done)

    def _synthesise_together(self, generations):
        """The round's audio: every answer's ready ODE windows and vocoder spans, as batches."""
        try:
            made = synthesise([generation.answer.wave for generation in generations])
        except Exception as e:  # noqa: BLE001  (a failed batch fails the answers in it, not the server)
            made = [e] * len(generations)
        for generation, pieces in zip(generations, made):
            try:
                if isinstance(pieces, Exception):
                    raise pieces
                self._deliver(generation, generation.answer.audio(pieces))
            except Exception as e:  # noqa: BLE001
                self._fail(generation, e)

    def _deliver(self, generation, events):
        for event in events:
            if isinstance(event, AudioChunk):
                if generation.heard_from is None:
                    generation.heard_from = self.clock()
                generation.audio_seconds += event.audio.shape[0] / event.sample_rate
            generation.deliver(event)

    def _fail(self, generation, error):
        if generation.answer is not None:
            generation.answer.close(error)
        elif generation.iterator is not None and hasattr(generation.iterator, "close"):
            generation.iterator.close()
        generation.deliver(Failed(error))
        self._retire(generation)

    def _step(self, generation):
        """One event of a generation, started if its turn has just come (the batched engine
        advances an answer pipeline with the others' from then on, after its prefill here)."""
        if generation.done:
            return
        try:
            if generation.iterator is None:
                started = generation.start()
                generation.deliver(Started())
                if self.batched and hasattr(started, "pending"):
                    # its prompt prefills in parts between rounds (as turns do); then it joins them
                    generation.iterator, generation.joining = started, True
                    _advance(self.prefilling, started.start_steps(), None, self._joining(generation))
                    return
                generation.iterator = iter(started)
            event = next(generation.iterator, Finished())
        except Exception as e:  # noqa: BLE001  (the client is told; the server goes on)
            if generation.answer is not None:
                self._fail(generation, e)
                return
            event = Failed(e)
        generation.deliver(event)
        if isinstance(event, (Finished, Failed)):
            self._retire(generation)

    def _joining(self, generation):
        """The `done` of an answer's prefill: its first events, then it joins the rounds."""
        def done(events, error):
            generation.joining = False
            if generation.done:  # cancelled or failed while its prefill waited
                return
            if error is not None:
                self._fail(generation, error)
                return
            generation.answer = generation.iterator
            self._deliver(generation, events)
            if generation.answer.done:
                self._finish_together([generation])
        return done

    def _close(self, generation):
        try:
            if not generation.done and generation.iterator is not None:
                generation.iterator.close()
        finally:
            self._retire(generation)

    def _retire(self, generation):
        generation.done = True
        with self.wake:
            if generation in self.active:
                self.active.remove(generation)
            if generation in self.waiting:
                self.waiting.remove(generation)


def _advance(waiting, steps, value, done):
    """Send `value` (or throw it, an exception) into the generator `steps`: its next request joins
    `waiting`; its end, or its error, goes to `done`."""
    try:
        request = steps.throw(value) if isinstance(value, Exception) else steps.send(value)
    except StopIteration as end:
        done(end.value, None)
    except Exception as e:  # noqa: BLE001  (handed to `done`)
        done(None, e)
    else:
        waiting.append((steps, request, done))


def _settle(future, result, error):
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def trim_heap():
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
