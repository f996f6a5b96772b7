"""The aiohttp application: the browser page, the voice WebSocket, OpenAI-style chat completions.

    GET  /                     the voice-chat page (static/)
    GET  /health               {"status", "sessions", "active", "queued", "caches", "cache_mb", "graphs", "busy_seconds"}
    GET  /health/live          200, or 503 when the model's thread is gone or stuck (for a load balancer)
    GET  /v1/models            the one model, OpenAI-style (and /v1/models/{id})
    GET  /v1/voice             WebSocket: the voice conversation (docs/voice_service.md)
    POST /v1/chat/completions  OpenAI's chat completions, streamed as server-sent events or whole

With an API key, /v1/* needs `Authorization: Bearer KEY` (browsers, which cannot set headers on a
WebSocket, may pass `?api_key=KEY`); the page and /health stay open, they carry no conversation.
Other web pages cannot drive the server from a visitor's browser: a request that carries an
`Origin` other than this server's own (or one of --allowed_origins) is refused, bodies must be
JSON (a form or text/plain POST needs no browser preflight), and a server on loopback answers only
to a loopback Host (a DNS-rebound name is refused).
"""
import asyncio
import copy
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
from aiohttp import web

from ..models.qwen2_5_omni.streaming import AudioChunk, TextDelta
from ..utils.graph_cache import StoredGraph
from .engine import Busy, Engine, Failed, Finished, Stopped, error_id
from .memory import MB, cache_pools, context_tokens
from .openai_api import ApiError, AudioTranscripts, ChatRequest, prepare_inputs
from .voice import VoiceConversation
from .warmup import warm_up

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ENGINE = web.AppKey("engine", Engine)
STATE = web.AppKey("state", dict)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
log = logging.getLogger(__name__)


def create_app(model, processor, options, loopback=True):
    """`loopback`: the server listens on a loopback address only (then the Host header must name one)."""
    app = web.Application(client_max_size=options.max_request_bytes,
                          middlewares=[_errors, _declared_size(options.max_request_bytes),
                                       _same_origin(options.allowed_origins, loopback), _auth(options.api_key)])
    app[STATE] = {"model": model, "processor": processor, "options": options, "sessions": 0,
                  "started": int(time.time()), "transcripts": AudioTranscripts(), "sockets": set()}
    app.router.add_get("/", _page)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/health", _health)
    app.router.add_get("/health/live", _live)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model_id:.+}", _model)
    app.router.add_get("/v1/voice", _voice)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.cleanup_ctx.append(_engine)
    if options.warmup:
        app.on_startup.append(_warm_up)  # after _engine's start (cleanup contexts start first)
    app.on_shutdown.append(_stop_serving)
    return app


async def _stop_serving(app):
    """Shutdown: the model thread stops after its current step (answers in progress end with an
    error), then every voice conversation is closed with 1001 (going away)."""
    await asyncio.to_thread(app[ENGINE].stop)
    for ws in list(app[STATE]["sockets"]):
        await ws.close(code=1001, message=b"the server is shutting down")


async def _engine(app):
    state = app[STATE]
    options = state["options"]
    # Every conversation's cache is a row of a pool (sessions hold one, answers one more), with
    # either engine: one set of compiled steps serves them all (a cache of its own would be a pool
    # of its own, with graphs of its own: +560 MB and slower under 16 clients, measured)
    model = state["model"]
    for runner, rows, _ in cache_pools(model, options):
        runner.use_pool(rows, model.cache_dtype)
    app[ENGINE] = Engine(options.max_active, options.max_queue, options.engine == "batched")
    # Requests (and voice conversations' texts) are decoded and tokenized on one thread with a
    # processor of its own, not on the model's thread, which every conversation shares: a fast tokenizer
    # used from two threads at once fails ("Already borrowed"); the model thread keeps the original.
    state["preprocess"] = ThreadPoolExecutor(1, thread_name_prefix="preprocess")
    state["request_processor"] = copy.deepcopy(state["processor"])
    yield
    app[ENGINE].stop()
    state["preprocess"].shutdown(wait=False, cancel_futures=True)


async def _warm_up(app):
    """Spoken turns through the engine before the port opens (serve/warmup.py); WarmupFailed
    stops the start."""
    state = app[STATE]
    print("warming up: spoken turns through the model ...", flush=True)
    rounds, seconds, graphs = await warm_up(app[ENGINE], state["model"], state["processor"], state["options"])
    print(f"warmed up in {seconds:.1f} s: {' + '.join(map(str, rounds))} answers at once, {graphs} graphs loaded",
          flush=True)


def _declared_size(max_bytes):
    """A body declared larger than the limit is refused before it is read: aiohttp would take in
    up to the limit (32 MB by default) first, and the client would upload it all for nothing."""
    @web.middleware
    async def check(request, handler):
        if request.content_length is not None and request.content_length > max_bytes:
            raise ApiError(413, f"request body too large: {request.content_length} bytes declared, at most "
                                f"{max_bytes} allowed", code="too_large")
        return await handler(request)
    return check


def _auth(api_key):
    expected = (api_key or "").encode()

    @web.middleware
    async def check(request, handler):
        if api_key and request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            given = header[len("Bearer "):] if header.startswith("Bearer ") else request.query.get("api_key", "")
            # headers are decoded leniently: a key that is not text is simply wrong
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
                raise ApiError(401, "invalid or missing API key: send Authorization: Bearer KEY",
                               code="invalid_api_key")
        return await handler(request)
    return check


def _same_origin(allowed_origins, loopback):
    allowed = {o.strip().rstrip("/") for o in allowed_origins.split(",") if o.strip()}

    @web.middleware
    async def check(request, handler):
        host = request.host or ""
        if loopback and urlsplit(f"//{host}").hostname not in LOOPBACK_HOSTS:
            raise ApiError(403, f"Host {host!r} is not this loopback server's: use http://127.0.0.1 or "
                                "http://localhost", code="host_not_allowed")
        origin = request.headers.get("Origin")
        if origin is not None and request.path.startswith("/v1/") and origin.rstrip("/") not in allowed \
                and urlsplit(origin).netloc != host:
            raise ApiError(403, f"web pages from {origin} may not call this server: use its own page, or start it "
                                f"with --allowed_origins {origin}", code="origin_not_allowed")
        if request.method == "POST" and request.content_type != "application/json":
            raise ApiError(415, f"the request body must be JSON (Content-Type: application/json), got "
                                f"{request.content_type!r}", code="unsupported_media_type")
        return await handler(request)
    return check


@web.middleware
async def _errors(request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status)
    except web.HTTPRequestEntityTooLarge as e:
        return web.json_response(ApiError(413, f"request body too large: {e.text}", code="too_large").body(),
                                 status=413)
    except web.HTTPException as e:  # 404, 405, ...: OpenAI-shaped too, so clients can read them
        if e.status < 400:
            raise
        return web.json_response(ApiError(e.status, f"{request.method} {request.path}: {e.reason}",
                                          code=e.reason.lower().replace(" ", "_")).body(),
                                 status=e.status, headers={k: v for k, v in e.headers.items() if k == "Allow"})


async def _page(request):
    return web.FileResponse(os.path.join(STATIC, "index.html"))


async def _health(request):
    state, engine = request.app[STATE], request.app[ENGINE]
    caches, cache_mb = await engine.call(_caches_in_use, state["model"])
    busy = {kind: round(seconds, 3) for kind, seconds in engine.busy_seconds.items()}
    return web.json_response({"status": "ok", "sessions": state["sessions"], **engine.load(), "caches": caches,
                              "cache_mb": cache_mb, "graphs": StoredGraph.held, "busy_seconds": busy})


async def _live(request):
    """Answered without the model's thread (which /health waits for): a balancer's check must not
    fail because a long round of answers is running, only because the thread died or is stuck."""
    stalled = request.app[ENGINE].stalled(request.app[STATE]["options"].stall_timeout)
    return web.json_response({"status": "stalled" if stalled else "ok"}, status=503 if stalled else 200)


def _caches_in_use(model):
    """(caches in use, MB of the shared pools' buffers)."""
    runners = [model.thinker_runner()] + ([model.talker_runner()] if model.has_talker else [])
    return (sum(runner.caches_in_use() for runner in runners),
            round(sum(runner.pool.nbytes for runner in runners if runner.pool is not None) / MB, 1))


def _model_card(state):
    name = os.path.basename(os.path.normpath(state["model"].name_or_path or "qwen2.5-omni"))
    return {"id": name, "object": "model", "created": state["started"], "owned_by": "local"}


async def _models(request):
    return web.json_response({"object": "list", "data": [_model_card(request.app[STATE])]})


async def _model(request):
    card = _model_card(request.app[STATE])
    if request.match_info["model_id"] != card["id"]:
        raise ApiError(404, f"model {request.match_info['model_id']!r} does not exist; this server has {card['id']!r}",
                       "model", "model_not_found")
    return web.json_response(card)


async def _voice(request):
    state = request.app[STATE]
    options = state["options"]
    # aiohttp refuses a frame of exactly max_msg_size bytes; ours is the largest one allowed
    ws = web.WebSocketResponse(max_msg_size=options.max_message_bytes + 1, heartbeat=30)
    await ws.prepare(request)
    if state["sessions"] >= options.max_sessions:
        await ws.send_str(json.dumps({"type": "error", "code": "too_many_sessions",
                                      "message": f"{options.max_sessions} conversations are open: try again later"}))
        await ws.close(code=1013, message=b"too many sessions")
        return ws
    state["sessions"] += 1
    state["sockets"].add(ws)
    try:
        await VoiceConversation(ws, request.app[ENGINE], state["model"], state["processor"], options,
                                (state["preprocess"], state["request_processor"].tokenizer)).run()
    except (ConnectionError, Stopped):  # the client went away mid-send, or the server is stopping
        pass
    finally:
        state["sessions"] -= 1
        state["sockets"].discard(ws)
        await ws.close()
    return ws


async def _chat_completions(request):
    state, engine = request.app[STATE], request.app[ENGINE]
    model, options = state["model"], state["options"]
    body = _json_body(await request.read())
    loop = asyncio.get_running_loop()
    chat = await loop.run_in_executor(state["preprocess"], ChatRequest, body, options, model, state["transcripts"])
    try:
        inputs = await loop.run_in_executor(state["preprocess"], prepare_inputs, state["request_processor"],
                                            chat.conversation)
    except ValueError as e:  # MediaError among them
        raise ApiError(400, str(e), "messages") from None
    prompt_tokens = int(inputs["input_ids"].shape[1])
    context = context_tokens(model, options)
    if prompt_tokens + chat.settings.max_new_tokens > context:
        raise ApiError(400, f"the conversation is {prompt_tokens} tokens; with max_completion_tokens "
                            f"{chat.settings.max_new_tokens} it exceeds this server's limit of {context} tokens",
                       "messages", "context_length_exceeded")
    kwargs = chat.settings.generate_kwargs()
    tokenizer = state["processor"].tokenizer  # the model thread's own
    try:
        generation = engine.submit(lambda: model.answer(tokenizer=tokenizer, **inputs, **kwargs))
    except Busy as e:
        raise ApiError(503, f"the server is busy ({e}): try again", code="busy") from None
    answer = _Answer(model, chat.settings.max_new_tokens, prompt_tokens)
    if not chat.stream:
        try:
            async for _ in answer.events(generation, request):
                pass
        except ConnectionError:  # the client went away: nobody is waiting for the answer
            return web.Response(status=499)
        finally:
            await engine.cancel(generation)  # stops an abandoned answer (a no-op when it finished)
        chat.remember(state["transcripts"], answer.text)
        return web.json_response(chat.completion(answer.text, answer.audio(), answer.finish_reason, answer.usage()))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(data):
        await response.write(f"data: {json.dumps(data)}\n\n".encode())

    try:
        await send(chat.chunk({"role": "assistant", "content": None if chat.settings.audio else ""}))
        async for event in answer.events(generation, request):
            if isinstance(event, TextDelta):
                await send(chat.chunk(chat.text_delta(event.text)))
            else:
                await send(chat.chunk(chat.audio_delta(event.audio)))
        await send(chat.chunk(finish_reason=answer.finish_reason))
        chat.remember(state["transcripts"], answer.text)
        if chat.include_usage:
            await send(chat.chunk(usage=answer.usage()))
        await response.write(b"data: [DONE]\n\n")
    except ApiError as e:  # the stream has begun: the error is its last event
        await send(e.body())
    except ConnectionError:  # the client went away mid-answer
        pass
    finally:
        await engine.cancel(generation)  # a client gone mid-answer stops it (no-op when it finished)
    return response


def _json_body(raw):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested beyond the parser's depth
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ApiError(400, f"the request body is not JSON: {reason}") from None


class _Answer:
    """A generation's events, kept for the totals OpenAI's answer carries."""

    def __init__(self, model, max_new_tokens, prompt_tokens):
        self.stop_ids = set(model.stop_token_ids)
        self.max_new_tokens, self.prompt_tokens = max_new_tokens, prompt_tokens
        self.tokens, self.pieces, self.chunks = [], [], []

    async def events(self, generation, request):
        """TextDelta (with text) and AudioChunk events; raises ApiError if the generation fails and
        ConnectionResetError when the client has gone away (checked every second)."""
        while True:
            try:
                event = await asyncio.wait_for(generation.events.get(), 1.0)
            except asyncio.TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("the client disconnected") from None
                continue
            if isinstance(event, Finished):
                return
            if isinstance(event, Failed):
                if isinstance(event.error, Stopped):
                    raise ApiError(503, str(event.error), code="shutting_down")
                if isinstance(event.error, ValueError):  # refused by the model's own checks
                    raise ApiError(400, str(event.error), code="invalid_request")
                raise ApiError(500, f"generation failed: internal error {error_id(log, 'answer', event.error)}",
                               code="generation_failed")
            if isinstance(event, TextDelta):
                self.tokens.append(event.token_id)
                self.pieces.append(event.text)
                if event.text:
                    yield event
            elif isinstance(event, AudioChunk):
                self.chunks.append(event.audio)
                yield event

    @property
    def text(self):
        return "".join(self.pieces)

    def audio(self):
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)

    @property
    def finish_reason(self):
        stopped = self.tokens and self.tokens[-1] in self.stop_ids
        return "length" if len(self.tokens) >= self.max_new_tokens and not stopped else "stop"

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_tokens + len(self.tokens)}
