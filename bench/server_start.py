"""The voice server's start and its first client's spoken turn, with the warm-up (the default) and
without it (`--no_warmup`), each in its own server process, the two alternating for `--rounds`.

    python bench/server_start.py                        # the bundled tiny checkpoint, --max_active 4
    python bench/server_start.py --model_path /models/Qwen2.5-Omni-7B --max_active 8

A JSON line per process: seconds from launch to "serving on", the first client's turn (a 2 s
question sent at once and ended; seconds from its end to the first audio chunk and to the answer's
end), the graphs that turn met for the first time, and the server's memory after it. Then a summary
line: each figure's median per side, and the first client's first audio warmed up over not.
"""
import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples", "qwen2_5_omni"))

from serve_load import TINY, question, timed_turn  # noqa: E402
from voice_server_client import start  # noqa: E402

from mindone_ext.serve.process import ServerProcess  # noqa: E402

FIGURES = ("start_s", "first_audio_s", "answer_s")


def graphs(server):
    with urllib.request.urlopen(server.url + "/health") as response:
        return json.loads(response.read())["graphs"]


async def first_turn(server, settings):
    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url) as ws:
        await start(ws, settings)
        began = time.perf_counter()
        _, audio, first_audio, _ = await timed_turn(ws, question(0, 3), timeout=600)
        return first_audio, time.perf_counter() - began, len(audio)


def one_server(args, warmup, round_):
    began = time.perf_counter()
    with ServerProcess(args.model_path, "--max_active", args.max_active, *([] if warmup else ["--no_warmup"])) as server:
        started, before = time.perf_counter() - began, graphs(server)
        settings = {"max_new_tokens": args.max_new_tokens, "talker_max_new_tokens": args.talker_max_new_tokens,
                    "seed": 0}  # the same answer from both servers
        first_audio, answer, samples = asyncio.run(first_turn(server, settings))
        return {"bench": "server_start", "warmup": warmup, "round": round_, "max_active": args.max_active,
                "start_s": round(started, 3), "first_audio_s": round(first_audio, 3), "answer_s": round(answer, 3),
                "answer_samples": samples, "graphs_at_start": before, "graphs_met": graphs(server) - before,
                "rss_mb": round(server.rss_mb(), 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=TINY)
    ap.add_argument("--max_active", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="server processes per side, alternating")
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--talker_max_new_tokens", type=int, default=100)
    args = ap.parse_args()
    records = {True: [], False: []}
    for round_ in range(args.rounds):
        for warmup in (True, False):
            records[warmup].append(one_server(args, warmup, round_))
            print(json.dumps(records[warmup][-1]), flush=True)
    medians = {side: {f: round(statistics.median(r[f] for r in records[warm]), 3) for f in FIGURES}
               for side, warm in (("warmup", True), ("no_warmup", False))}
    print(json.dumps({"bench": "server_start", "summary": True, "medians": medians,
                      "ratio_first_audio_warmup_vs_not": round(medians["warmup"]["first_audio_s"]
                                                               / medians["no_warmup"]["first_audio_s"], 3)}), flush=True)


if __name__ == "__main__":
    main()
