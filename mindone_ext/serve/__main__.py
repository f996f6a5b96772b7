"""Serve Qwen2.5-Omni for voice chat: a browser page, a WebSocket protocol, OpenAI-style HTTP.

    python -m mindone_ext.serve --model_path /models/Qwen2.5-Omni-7B --mindspore_dtype bfloat16
    # then open http://127.0.0.1:8000 and press Start
    python -m mindone_ext.serve    # the bundled tiny random checkpoint (in a source checkout)

Binds to 127.0.0.1 unless --host says otherwise; any other address needs an API key (--api_key
or the MINDONE_API_KEY environment variable), which clients send as `Authorization: Bearer KEY`.
The line "serving on http://HOST:PORT" is printed once the port is open (--port 0 picks a free one),
after the warm-up's spoken turns (serve/warmup.py; --no_warmup skips them).
"""
import argparse
import asyncio
import ipaddress
import os
import signal
import sys
import tempfile
import traceback
from dataclasses import fields

from .. import bundled
from ..utils.without_torch import transformers_without_torch
from .options import ENGINES, ServeOptions  # plain Python: --help answers without importing MindSpore

DTYPES = ("float32", "float16", "bfloat16")
HELP = {
    "max_active": "answers generated at once (0: as many as --cache_memory_mb holds)",
    "engine": "batched: the active answers' decode steps run as one compiled step (their caches are rows of a "
              "pool); interleaved: one answer's step at a time",
    "max_queue": "answers waiting beyond those; more are refused with a busy error",
    "max_sessions": "open voice conversations",
    "idle_timeout": "seconds a voice conversation may stay silent before it is closed",
    "max_audio_seconds": "audio of one user turn",
    "max_image_pixels": "pixels of one image, by its declared size (refused before decoding)",
    "max_message_bytes": "one WebSocket frame",
    "max_request_bytes": "one HTTP request body",
    "max_context_tokens": "tokens of one conversation or request, prompt and answers (capped at the model's context)",
    "max_new_tokens": "text tokens of an answer, at most (clients may ask for fewer)",
    "talker_max_new_tokens": "codec tokens of an answer, 50 per second of speech, at most",
    "speaker": "the default voice",
    "api_key": "required from clients when set (default: $MINDONE_API_KEY)",
    "allowed_origins": "comma-separated web origins, besides this server's own page, allowed to call it "
                       "(e.g. https://app.example.com)",
    "stall_timeout": "seconds one model step (a round of answers, a prefill) may take before GET /health/live "
                     "answers 503, so that a load balancer takes the process out",
    "cache_memory_mb": "memory the KV caches and conversations' states may take: the server refuses to start when "
                       "its limits (conversations, answers, context tokens) could need more (default: no check; "
                       "the bound is printed)",
}
NO_WARMUP_HELP = ("serve at once, without first answering spoken turns (1, 2, 4, ... at once, up to --max_active) "
                  "through the model: its first clients then wait for its graphs' first calls")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mindone_ext.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=None, help="a Hugging Face Qwen2.5-Omni folder (default: the bundled "
                    "tiny random checkpoint of a source checkout)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--mindspore_dtype", choices=DTYPES, default="float32")
    ap.add_argument("--attn_implementation", choices=["eager", "sdpa", "flash_attention_2"], default="eager")
    ap.add_argument("--device_target", choices=["CPU", "Ascend"], default=None)
    ap.add_argument("--no_audio_output", action="store_true", help="text answers only (skips loading the Talker)")
    ap.add_argument("--no_warmup", action="store_true", help=NO_WARMUP_HELP)
    defaults = ServeOptions()
    for field in fields(ServeOptions):
        if field.name == "warmup":
            continue
        default = getattr(defaults, field.name)
        kind = str if field.name in ("api_key", "allowed_origins", "engine") else \
            float if field.name == "cache_memory_mb" else type(default)
        told = f"{default}; {bundled.TALKER_TOKENS} on the bundled checkpoint" if field.name == "talker_max_new_tokens" \
            else default
        ap.add_argument(f"--{field.name}", type=kind, default=None if field.name == "talker_max_new_tokens" else default,
                        choices=ENGINES if field.name == "engine" else None, help=f"{HELP[field.name]} (default {told})")
    args = ap.parse_args(argv)
    if args.model_path is None:
        if not os.path.isdir(bundled.CHECKPOINT):
            ap.error("--model_path is required (this installation has no bundled checkpoint)")
        args.model_path = bundled.CHECKPOINT
    if args.talker_max_new_tokens is None:
        args.talker_max_new_tokens = bundled.talker_max_new_tokens(args.model_path)
    args.api_key = args.api_key or os.environ.get("MINDONE_API_KEY") or None
    if not _loopback(args.host) and not args.api_key:
        ap.error(f"--host {args.host} exposes the service beyond this machine: set --api_key or MINDONE_API_KEY")
    try:
        given = {f.name: getattr(args, f.name) for f in fields(ServeOptions) if f.name != "warmup"}
        args.options = ServeOptions(**given, warmup=not args.no_warmup)
    except ValueError as e:
        ap.error(str(e))
    return args


def _loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StartInterrupted(Exception):
    """A signal came before the server was serving (during the warm-up)."""


async def serve(app, host, port):
    """Serve until SIGINT or SIGTERM; then the model stops after its current step, answers in
    progress end with an error, connections close, and the process exits. A second signal exits
    at once. A signal before the port opens (during the warm-up) ends the start: StartInterrupted."""
    from aiohttp import web

    start = asyncio.current_task()
    stop = asyncio.Event()
    serving = False

    def on_signal():
        if stop.is_set():
            os._exit(1)
        stop.set()
        if not serving:
            start.cancel()

    # Both signals alike, from the start: MindSpore's graph runs replace the SIGINT handler with
    # one that sends the process SIGTERM, so Ctrl-C arrives as SIGTERM once a graph has run.
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, on_signal)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    try:
        await runner.setup()
    except BaseException as e:
        # the model thread stops (after its current step) before the process exits: MindSpore's
        # exit waits for its work, and a step still running would never end
        await runner.cleanup()
        if isinstance(e, asyncio.CancelledError):
            raise StartInterrupted from None
        raise
    serving = True
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    print(f"serving on http://{host}:{bound[1]}", flush=True)
    await stop.wait()
    print("stopping", flush=True)
    await runner.cleanup()


def main(argv=None):
    args = parse_args(argv)
    try:
        import aiohttp  # noqa: F401
        import webrtcvad  # noqa: F401
    except ImportError as e:
        sys.exit(f"the voice service needs {e.name}: pip install 'mindone_ext[serve]' (aiohttp, webrtcvad-wheels)")
    transformers_without_torch()
    import mindspore as ms

    from .. import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor
    from .app import create_app
    from .memory import MB, check_cache_memory, context_tokens, fit_to_memory
    from .warmup import WarmupFailed

    if args.device_target:
        ms.set_context(device_target=args.device_target)
    if not os.path.isdir(args.model_path):
        sys.exit(f"--model_path {args.model_path}: not a folder")
    import mindone_ext

    print(f"mindone_ext {mindone_ext.__version__} from {os.path.dirname(os.path.abspath(mindone_ext.__file__))}")
    print(f"loading {args.model_path} ...", flush=True)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
        args.model_path, mindspore_dtype=getattr(ms, args.mindspore_dtype), attn_implementation=args.attn_implementation,
        enable_audio_output=not args.no_audio_output)
    processor = Qwen2_5OmniProcessor.from_pretrained(args.model_path)
    options = args.options
    if model.has_talker and not model.speakers:
        from ..models.qwen2_5_omni.speakers import no_speakers_message

        sys.exit(f"error: {no_speakers_message(args.model_path)} (or serve text only: --no_audio_output)")
    if model.has_talker and options.speaker not in model.speakers:
        sys.exit(f"--speaker {options.speaker!r} is not in the checkpoint; "
                 f"available: {', '.join(sorted(model.speakers))}")
    try:
        options = fit_to_memory(model, options)
        bound = check_cache_memory(model, options)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"KV caches and conversation states: at most {bound / MB:.0f} MB ({options.max_sessions} conversations, "
          f"{options.max_active} answers, {context_tokens(model, options)} tokens each)", flush=True)
    # MindSpore writes a compile failure's analysis (rank_0/om/analyze_fail.ir) into the working
    # directory; the server's is a folder of its own, removed at exit (paths were resolved above).
    with tempfile.TemporaryDirectory(prefix="mindone-serve-") as workdir:
        os.chdir(workdir)
        try:
            asyncio.run(serve(create_app(model, processor, options, loopback=_loopback(args.host)), args.host,
                              args.port))
        except WarmupFailed as e:
            if e.__cause__ is not None:  # the model failed (it would fail every client): its trace first
                traceback.print_exception(e.__cause__)
            sys.exit(f"error: {e}; not serving")
        except StartInterrupted:
            sys.exit("interrupted before serving")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # everything is closed and flushed: skip MindSpore's seconds-long teardown
