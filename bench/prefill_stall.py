"""How long a long typed turn stalls an answer in progress in the voice server's engine: the
engine's chunked prefill (at most PREFILL_BUDGET turn tokens between two rounds of answers) against
turns run to their end, alternating in one process on the same model.

    python bench/prefill_stall.py                   # the bundled tiny checkpoint, a ~3200-token turn
    python bench/prefill_stall.py --words 100 --model_path /models/Qwen2.5-Omni-7B
    python bench/prefill_stall.py --audio_seconds 30  # an HTTP request's 30 s of audio instead
    python bench/prefill_stall.py --spoken          # the long turn then answered aloud: its Talker prompt too

Each run: one conversation's text answer is being decoded (200 tokens, no end token) when another
conversation's long turn arrives (or, with --audio_seconds, an answer to an HTTP-style prompt of
that much speech-like audio, whose audio is encoded in parts counted in the same budget); the
answer's longest gap between two text deltas and the turn's time (to the other answer's first
token; with --spoken, to the end of the spoken answer) are measured (each policy's graphs built by
a first run, not counted). With --spoken, the long turn's conversation then answers aloud (its
Talker prompt, the whole conversation, prefills too) while the other answer goes on. A JSON line
per run, then a summary line with each policy's medians and the ratio of their longest gaps.
"""
import argparse
import asyncio
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mindone_ext import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor, bundled  # noqa: E402
from mindone_ext.models.qwen2_5_omni.session import ConversationSession  # noqa: E402
from mindone_ext.serve.engine import PREFILL_BUDGET, Engine, Failed, Finished  # noqa: E402
from mindone_ext.utils.audio import speech_like  # noqa: E402

ANSWER = dict(max_new_tokens=200, eos_token_id=[], return_audio=False)
SPOKEN = dict(max_new_tokens=4, eos_token_id=[], talker_max_new_tokens=8, seed=0)
CONTEXT = 16384


async def stalled(model, processor, turn, budget, spoken=False):
    """(longest gap between the answer's events, median gap, the turn's seconds, its tokens).
    `turn`: a typed turn's text, or the processor's inputs of a prompt to answer; `spoken`: the
    typed turn is then answered aloud."""
    engine = Engine(max_active=2, max_queue=0, batched=True, prefill_budget=budget)
    try:
        new = lambda: ConversationSession(model, processor, max_tokens=CONTEXT)  # noqa: E731
        speaking, typing = await engine.call(new), await engine.call(new)
        await engine.call(speaking.ask, "hi")
        run = engine.submit(lambda: speaking.answer(**ANSWER))
        arrivals = []

        async def listen():
            while not arrivals or not isinstance(arrivals[-1][1], (Finished, Failed)):
                event = await run.events.get()
                arrivals.append((time.perf_counter(), event))

        listening = asyncio.ensure_future(listen())
        while len(arrivals) < 20:  # the answer is under way
            await asyncio.sleep(0.001)
        began = time.perf_counter()
        if isinstance(turn, str):
            await engine.call_steps(typing.ask_steps, turn)
            tokens = typing.cache.length
            if spoken:
                aloud = engine.submit(lambda: typing.answer(spk=next(iter(model.speakers)), **SPOKEN))
                while not isinstance(await aloud.events.get(), (Finished, Failed)):
                    pass
        else:  # an HTTP request's prompt: its answer's first token ends the turn
            other = engine.submit(lambda: model.answer(**turn, max_new_tokens=1, eos_token_id=[], return_audio=False))
            while not isinstance(await other.events.get(), (Finished, Failed)):
                pass
            tokens = turn["input_ids"].shape[1]
        took = time.perf_counter() - began
        await listening
        for session in (speaking, typing):
            await engine.call(session.close)
        gaps = [b - a for (a, _), (b, _) in zip(arrivals, arrivals[1:])]
        return max(gaps), statistics.median(gaps), took, tokens
    finally:
        engine.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=bundled.CHECKPOINT)
    ap.add_argument("--words", type=int, default=400, help="the turn: 'word0 word1 ...' (~8 tokens a word)")
    ap.add_argument("--audio_seconds", type=float, default=0.0,
                    help="instead of the typed turn: an answer to this much audio (at most 30 s)")
    ap.add_argument("--spoken", action="store_true", help="the typed turn then answered aloud (its Talker prompt)")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per policy, alternating")
    args = ap.parse_args()
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(args.model_path)
    processor = Qwen2_5OmniProcessor.from_pretrained(args.model_path)
    model.thinker_runner().use_pool(4, model.cache_dtype)  # conversations as rows of one pool, as in the server
    if args.spoken:
        model.talker_runner().use_pool(2, model.cache_dtype)
    turn = " ".join(f"word{i}" for i in range(args.words))
    if args.audio_seconds:
        conversation = [{"role": "user", "content": [{"type": "audio", "audio": "question.wav"}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        turn = dict(processor(prompt, audio=[speech_like(args.audio_seconds, 16000)]))
    policies = {"chunked": PREFILL_BUDGET, "whole": None}
    for budget in policies.values():
        asyncio.run(stalled(model, processor, turn, budget, args.spoken))  # graphs built
    records = {name: [] for name in policies}
    for run in range(args.runs):
        for name, budget in policies.items():
            gap, median_gap, took, tokens = asyncio.run(stalled(model, processor, turn, budget, args.spoken))
            records[name].append({"bench": "prefill_stall", "policy": name, "budget": budget, "run": run,
                                  "audio_seconds": args.audio_seconds, "spoken": args.spoken,
                                  "turn_tokens": tokens, "turn_s": round(took, 4),
                                  "longest_gap_ms": round(1000 * gap, 2), "median_gap_ms": round(1000 * median_gap, 2)})
            print(json.dumps(records[name][-1]), flush=True)
    medians = {name: {f: round(statistics.median(r[f] for r in runs), 3) for f in ("longest_gap_ms", "turn_s")}
               for name, runs in records.items()}
    print(json.dumps({"bench": "prefill_stall", "summary": True, "medians": medians,
                      "ratio_longest_gap_chunked_vs_whole": round(medians["chunked"]["longest_gap_ms"]
                                                                  / medians["whole"]["longest_gap_ms"], 3)}), flush=True)


if __name__ == "__main__":
    main()
