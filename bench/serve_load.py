"""Load on the voice server: many simulated clients talking at once over loopback, with the
batched engine and with the interleaved one, each in its own server process, in the same run.

    python bench/serve_load.py                          # 16 clients x 3 spoken turns, tiny checkpoint
    python bench/serve_load.py --clients 32 --max_active 8 --model_path /models/Qwen2.5-Omni-7B

Each client holds a WebSocket conversation and speaks `--turns` questions (generated speech-like
clips ended with "end"), each as soon as the previous answer is done: sent at once (`--pace
burst`, the most load clients can make), or as people talk (`--pace realtime`: the audio sent as
it is spoken, in frames of `--frame_seconds`, and the next question asked once the answer has
played, its playback begun with its first audio chunk; the throughput is then what the clients
ask for, not what the server could give). Clients start together, or each at a random moment of
the first `--stagger` seconds (people do not all speak at once; together, their turns stay in
step: each answer starts with all the others). Clients follow one of `--scripts` scripts; every
script is first run alone, which gives the answers each turn must reproduce under load (greedy
text, seeded speech: a session that saw another's text or cache would differ) and the time to
first audio with no load. A turn refused as busy is retried after a pause (the server forgot it,
so the retry continues the same conversation). Afterwards the server must hold no session and no
cache, and its resident memory is compared with what it was before the load.

Prints a JSON line per engine: answered / busy refusals / hung / mismatched turns, throughput
(answers per minute and codec tokens per second under load: audio seconds x 50 / wall time), p50
and p95 of the time from "end" to the first audio chunk under load and alone, p50 of the time from
"end" to the answer's end (`answer_p50_s`: these short answers' audio is one window, so their
first audio comes near their end, and with clients that wait for it a turn lasts about clients /
throughput), and the server's memory before and after; then a summary line with the batched
engine's ratios (first audio under load vs alone, throughput vs the interleaved engine) and the
throughput ratio's ceiling on this machine: the interleaved engine's wall time per answer over the
batched engine's Token2Wav seconds per answer (its ODE and vocoder batches: compute-bound on a
CPU, a batch of 16 ODE windows costs ~5x one window), the ratio the batched engine would reach if
all its other work cost nothing and its Token2Wav batches stayed as this load made them; with
burst clients, also the first-audio ratio's floor by the same token: clients that ask again at
once make a turn last clients / throughput on average (Little's law), and the model thread makes
at most one answer per its Token2Wav seconds, so a turn lasts at least clients x those seconds
(these answers' first audio comes near their turn's end), here over the first audio alone. Each
engine's line holds where its model thread's time went under the load (the server's
`busy_seconds`, per answer; `idle`: the rest of the wall time, waiting for the clients' turns and
the engine's loop). The compiled graphs the server holds are reported with the memory (a round
that met a new shape compiled a graph, which stays allocated: memory that grows in a round that
compiled nothing is a leak). Exits 1 when a turn hung or mismatched, or a server kept state.
"""
import argparse
import asyncio
import json
import os
import random
import sys
import time

import aiohttp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples", "qwen2_5_omni"))

from demo_media import speech_like  # noqa: E402
from voice_server_client import OUT_RATE, ServerError, speak_turn, start  # noqa: E402

from mindone_ext.serve.process import ServerProcess  # noqa: E402

TINY = os.path.join(ROOT, "examples", "qwen2_5_omni", "tiny-qwen2.5-omni")
SAMPLES_PER_CODEC_TOKEN = 480  # 2 mel frames x the vocoder's hop of 240 at 24 kHz (50 tokens per second)


def question(script, turn):
    samples = speech_like(0.8 + 0.3 * turn, 16000, seed=1000 * script + turn)
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


async def timed_turn(ws, pcm, timeout, frame_seconds=1.0, realtime=False):
    """One spoken turn: (text, audio, seconds from the turn's end to the first audio chunk and to
    the answer's end); `realtime`: the audio sent as spoken, and returns once the answer has played."""
    ended, first_audio = [], []

    def heard(_):
        if not first_audio:
            first_audio.append(time.perf_counter() - ended[0])

    async with asyncio.timeout(timeout):
        text, audio = await speak_turn(ws, pcm, frame_seconds=frame_seconds, on_audio=heard,
                                       on_end=lambda: ended.append(time.perf_counter()), realtime=realtime)
    answered = time.perf_counter() - ended[0]
    if realtime and first_audio:  # the listener hears it to its end
        await asyncio.sleep(max(0.0, first_audio[0] + len(audio) / OUT_RATE - answered))
    return text, audio, first_audio[0] if first_audio else None, answered


async def client(url, script, turns, settings, args, stats, reference=None, delay=0.0):
    """Runs a script, starting after `delay` seconds; returns [(text, audio, first_audio, answered)]
    per answered turn."""
    answers = []
    await asyncio.sleep(delay)
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await start(ws, settings)
        for turn in range(turns):
            for attempt in range(args.retries + 1):
                try:
                    answers.append(await timed_turn(ws, question(script, turn), args.timeout, args.frame_seconds,
                                                    args.pace == "realtime"))
                    break
                except ServerError as e:
                    if e.code != "busy":
                        raise
                    stats["busy_refusals"] += 1
                    await asyncio.sleep(args.backoff * (1 + random.random()))
                except TimeoutError:
                    stats["hung"] += 1
                    return answers
            else:
                stats["refused"] += turns - turn  # gave up: the rest of the script is not spoken
                return answers
            if reference is not None:
                want_text, want_audio = reference[turn][:2]
                text, audio = answers[-1][:2]
                same = text == want_text and audio.shape == want_audio.shape and \
                    (not len(audio) or float(np.abs(audio - want_audio).max()) <= 1e-5)
                stats["mismatched"] += not same
    return answers


async def health(url):
    async with aiohttp.ClientSession() as http, http.get(url + "/health") as response:
        return await response.json()


async def settle(url, seconds=60):
    """The server's health once no session, answer or cache is left (or after `seconds`)."""
    deadline = time.time() + seconds
    while True:
        state = await health(url)
        if (state["sessions"], state["active"], state["queued"], state["caches"]) == (0, 0, 0, 0) \
                or time.time() > deadline:
            await asyncio.sleep(1.0)  # the model thread returns freed heap pages once idle (after this call)
            return state
        await asyncio.sleep(0.2)


def percentile(values, q):
    return round(float(np.percentile(values, q)), 3) if values else None


async def run(server, args, engine):
    settings = {"seed": 0, "max_new_tokens": args.max_new_tokens, "talker_max_new_tokens": args.talker_max_new_tokens}
    stats = {"busy_refusals": 0, "refused": 0, "hung": 0, "mismatched": 0}
    # warm-up: graphs compiled before timing, those of batched steps too (as many at once as may
    # run, every turn of the scripts: later turns meet longer caches)
    await asyncio.gather(*(client(server.ws_url, i % args.scripts, args.turns, settings, args, stats)
                           for i in range(min(args.max_active, args.clients))))
    references = [await client(server.ws_url, s, args.turns, settings, args, stats) for s in range(args.scripts)]
    alone = [first for answers in references for _, _, first, _ in answers if first is not None]
    alone_answers = [answered for answers in references for *_, answered in answers]
    before = await settle(server.url)
    graphs_before = before["graphs"]
    rss_before = server.rss_mb()
    start = time.perf_counter()
    results, rss_after, graphs_after = [], [], []
    for _ in range(args.rounds):
        results += await asyncio.gather(*(client(server.ws_url, i % args.scripts, args.turns, settings, args, stats,
                                                 references[i % args.scripts], args.stagger * random.random())
                                          for i in range(args.clients)))
        after = await settle(server.url)
        rss_after.append(round(server.rss_mb(), 1))
        graphs_after.append(after["graphs"])
    wall = time.perf_counter() - start
    under_load = [first for answers in results for _, _, first, _ in answers if first is not None]
    answer_times = [answered for answers in results for *_, answered in answers]
    answered = sum(len(a) for a in results)
    busy_ms = {kind: round(1000 * (after["busy_seconds"][kind] - seconds) / max(answered, 1), 1)
               for kind, seconds in before["busy_seconds"].items()}
    busy_ms["idle"] = round(1000 * wall / max(answered, 1) - sum(busy_ms.values()), 1)  # (and the loop between)
    codec_tokens = sum(len(audio) for answers in results for _, audio, *_ in answers) / SAMPLES_PER_CODEC_TOKEN
    return {"bench": "serve_load", "impl": "mindone_ext", "engine": engine, "clients": args.clients,
            "turns": args.turns, "pace": args.pace, "stagger_s": args.stagger, "max_active": args.max_active,
            "max_queue": args.max_queue,
            "answers_per_min": round(60 * answered / wall, 2), "codec_tokens_per_s": round(codec_tokens / wall, 2),
            "answered": answered, "busy_refusals": stats["busy_refusals"],
            "refused": stats["refused"], "hung": stats["hung"], "mismatched": stats["mismatched"],
            "first_audio_p50_s": percentile(under_load, 50), "first_audio_p95_s": percentile(under_load, 95),
            "alone_first_audio_p50_s": percentile(alone, 50), "alone_first_audio_p95_s": percentile(alone, 95),
            "answer_p50_s": percentile(answer_times, 50), "alone_answer_p50_s": percentile(alone_answers, 50),
            "busy_ms_per_answer": busy_ms, "rounds": args.rounds, "wall_s": round(wall, 1),
            "rss_before_mb": round(rss_before, 1),
            "rss_after_mb": rss_after, "graphs_before": graphs_before, "graphs_after": graphs_after,
            "sessions_after": after["sessions"], "caches_after": after["caches"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=TINY)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--scripts", type=int, default=4, help="distinct conversations among the clients")
    ap.add_argument("--max_active", type=int, default=4)
    ap.add_argument("--engines", default="batched,interleaved", help="comma-separated, each its own server")
    ap.add_argument("--max_queue", type=int, default=8)
    ap.add_argument("--pace", choices=["burst", "realtime"], default="burst",
                    help="questions sent at once, or as spoken with answers heard to their end (see above)")
    ap.add_argument("--frame_seconds", type=float, default=1.0, help="audio per WebSocket frame of a question")
    ap.add_argument("--stagger", type=float, default=0.0, help="seconds over which the clients' starts are spread")
    ap.add_argument("--max_new_tokens", type=int, default=6)
    ap.add_argument("--talker_max_new_tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1, help="times the clients connect and talk (memory after each)")
    ap.add_argument("--retries", type=int, default=100, help="per turn, after a busy refusal")
    ap.add_argument("--backoff", type=float, default=1.0, help="seconds before a retry (times 1 to 2)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a turn may take before it counts as hung")
    args = ap.parse_args()
    if args.frame_seconds * 16000 < 1 or args.stagger < 0:
        ap.error(f"--frame_seconds must hold a sample (>= 1/16000) and --stagger be >= 0; got {args.frame_seconds} "
                 f"and {args.stagger}")
    results = {}
    for engine in args.engines.split(","):
        random.seed(0)
        with ServerProcess(args.model_path, "--max_active", args.max_active, "--max_queue", args.max_queue,
                           "--max_sessions", args.clients + 1, "--engine", engine) as server:
            results[engine] = asyncio.run(run(server, args, engine))
        print(json.dumps(results[engine]), flush=True)
    if {"batched", "interleaved"} <= set(results):
        batched, interleaved = results["batched"], results["interleaved"]
        ratio = lambda a, b: round(a / b, 2) if a and b else None  # noqa: E731
        print(json.dumps({"bench": "serve_load", "summary": True,
                          "ratio_first_audio_p50_load_vs_alone": ratio(batched["first_audio_p50_s"],
                                                                       batched["alone_first_audio_p50_s"]),
                          "ratio_throughput_batched_vs_interleaved": ratio(batched["codec_tokens_per_s"],
                                                                           interleaved["codec_tokens_per_s"]),
                          "ratio_throughput_ceiling": ratio(60000 / interleaved["answers_per_min"],
                                                            batched["busy_ms_per_answer"]["token2wav"]),
                          "ratio_first_audio_floor": ratio(args.clients * batched["busy_ms_per_answer"]["token2wav"],
                                                           1000 * batched["alone_first_audio_p50_s"])
                          if args.pace == "burst" else None}),
              flush=True)
    failed = any(r["hung"] or r["mismatched"] or r["sessions_after"] or r["caches_after"] for r in results.values())
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
