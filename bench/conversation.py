"""A spoken answer late in a conversation: ours keeping the conversation in its caches (the
Thinker's, and the Talker's between answers: ConversationSession's default), ours re-prefilling the
Talker's whole prompt at each answer (`keep_talker_cache=False`), and the PyTorch reference, which
keeps nothing between turns: its generate() runs the whole conversation again at every answer.

    python bench/conversation.py                       # the bundled tiny checkpoint, 12 turns
    python bench/conversation.py --model_path DIR --turns 20 --impls ours,reference

Every turn is the same typed question, every answer spoken (greedy Thinker and Talker, seeded,
exactly `--text_tokens` and `--codec_tokens` tokens). Timed: the answers of the last `--timed`
turns (their median): for ours the first audio chunk and the whole answer, and the Talker tokens
prefilled; for the reference the whole answer on the same conversation (our session's token ids,
which it runs through its Thinker and Talker from the first token). Ours and the reference run in
one process each, one after another. JSON lines: one per implementation, then the summary.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402
from latency import default_model, reference_model  # noqa: E402

QUESTION = "Tell me more about the weather in the mountains, and then about the sea. " * 3


def settings(args):
    return dict(spk="Ethan", max_new_tokens=args.text_tokens, eos_token_id=[], talker_do_sample=False,
                talker_max_new_tokens=args.codec_tokens, seed=0)


def run_ours(args, keep):
    """Each timed answer's (conversation tokens, first audio s, whole answer s, Talker tokens
    prefilled), and the conversation's token ids it answered."""
    from mindone_ext import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor
    from mindone_ext.models.qwen2_5_omni.session import ConversationSession
    from mindone_ext.models.qwen2_5_omni.streaming import AudioChunk

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(args.model_path)
    processor = Qwen2_5OmniProcessor.from_pretrained(args.model_path)
    runner, written = model.talker_runner(), []
    extend = runner.extend
    runner.extend = lambda cache, embeds, *a: written.append(embeds.shape[1]) or extend(cache, embeds, *a)
    timed, conversations = [], []
    for rounds in range(2):  # the first conversation compiles the shapes the second meets
        session = ConversationSession(model, processor, keep_talker_cache=keep)
        for turn in range(args.turns):
            session.ask(QUESTION)
            prompt = session.ids.copy()
            written.clear()
            start, first_audio = time.perf_counter(), None
            for event in session.respond(**settings(args)):
                if isinstance(event, AudioChunk) and first_audio is None:
                    first_audio = time.perf_counter() - start
            if rounds and turn >= args.turns - args.timed:
                timed.append((prompt.shape[1], first_audio, time.perf_counter() - start, sum(written)))
                conversations.append(prompt)
        session.close()
    return timed, conversations


def run_reference(args, conversations):
    import torch

    model = reference_model(args.model_path)
    times = []
    for rounds in range(2):
        for ids in conversations:
            torch.manual_seed(0)
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=torch.tensor(ids), speaker="Ethan", thinker_max_new_tokens=args.text_tokens,
                               thinker_do_sample=False, thinker_eos_token_id=None, talker_do_sample=False,
                               talker_max_new_tokens=args.codec_tokens)
            if rounds:
                times.append(time.perf_counter() - start)
    return times


def child(args):
    import json

    if args.impl == "reference":
        conversations = json.loads(sys.stdin.read())
        times = run_reference(args, conversations)
        return emit(dict(bench="conversation", impl="reference", conversation_tokens=[len(c[0]) for c in conversations],
                         whole_s=round(statistics.median(times), 3)))
    timed, conversations = run_ours(args, keep=args.impl == "ours")
    emit(dict(bench="conversation", impl=args.impl, conversation_tokens=[t[0] for t in timed],
              first_audio_s=round(statistics.median(t[1] for t in timed), 3),
              whole_s=round(statistics.median(t[2] for t in timed), 3),
              talker_tokens_prefilled=[t[3] for t in timed], conversations=[c.tolist() for c in conversations]))


def main():
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=None, help="a Qwen2.5-Omni folder (default: the bundled tiny checkpoint)")
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--timed", type=int, default=3, help="the last turns whose answers are timed")
    ap.add_argument("--text_tokens", type=int, default=8)
    ap.add_argument("--codec_tokens", type=int, default=40)
    ap.add_argument("--impls", default="ours,ours_whole_talker_prompt,reference")
    ap.add_argument("--impl", help=argparse.SUPPRESS)  # one child process
    args = ap.parse_args()
    if not 1 <= args.timed <= args.turns:
        ap.error(f"--timed must be between 1 and --turns ({args.turns}), got {args.timed}")
    args.model_path = args.model_path or default_model()
    if args.impl:
        return child(args)
    records, conversations = {}, None
    for impl in args.impls.split(","):
        command = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--model_path", args.model_path,
                   "--turns", str(args.turns), "--timed", str(args.timed), "--text_tokens", str(args.text_tokens),
                   "--codec_tokens", str(args.codec_tokens)]
        if impl == "reference" and conversations is None:
            sys.exit("the reference runs the conversations one of ours made: list it after ours")
        out = subprocess.run(command, capture_output=True, text=True, check=False,
                             input=json.dumps(conversations) if impl == "reference" else None)
        if out.returncode:
            sys.exit(f"{impl} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        record = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
        conversations = record.pop("conversations", conversations)
        records[impl] = record
        emit(record)
    summary = dict(bench="conversation")
    ours, whole, reference = (records.get(k) for k in ("ours", "ours_whole_talker_prompt", "reference"))
    if ours and whole:
        summary["ratio_first_audio_kept_vs_whole_talker_prompt"] = round(ours["first_audio_s"] / whole["first_audio_s"], 3)
    if ours and reference:
        summary["ratio_first_audio_vs_reference_whole"] = round(ours["first_audio_s"] / reference["whole_s"], 3)
        summary["ratio_whole_vs_reference_whole"] = round(ours["whole_s"] / reference["whole_s"], 3)
    emit(summary)


if __name__ == "__main__":
    main()
