"""Answer latency of one spoken turn, ours against the PyTorch reference on the same checkpoint.

    python bench/latency.py                  # the bundled tiny checkpoint (framework overhead only)
    python bench/latency.py --model_path DIR # any Qwen2.5-Omni folder

The turn: a spoken question (espeak-ng, ~3 s), `--text_tokens` greedy text tokens, then
`--codec_tokens` greedy codec tokens (2 s of speech at 50 tokens/s) and Token2Wav. Each
implementation runs in its own new process (so its first call is a cold start): the first
whole answer (`cold`: graphs compile or load), then `--warm_runs` more (`warm`: their median, each
in `whole_warm_runs_s`; this machine's load moves a single answer by up to ~30%), then for ours
streamed answers (`generate_stream`: first text token, first audio chunk, all chunks; the medians of
`--warm_runs` answers after a first one, which compiles the chunk windows' graphs: `first_stream_total_s`).

Ours runs three times, with graphs stored in a folder of this run (utils/graph_cache.py):
`ours_empty_store` first (it compiles and stores), then `ours` (a new process that loads them:
a machine's second and later runs), and `ours_store_off` (MINDONE_EXT_GRAPH_CACHE=off: every
graph compiles in the process, the vocoder runs op by op). `voice_chatting` is the README's
first command from a new process to its exit, with the stored graphs.
`ours` and `reference` run `--rounds` processes each, alternating, so that a slow spell of the
machine falls on both; the summary's ratios take each figure's median over an implementation's
processes. JSON lines: one per process (its `round`), then the summary with the ratios.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
          "and visual inputs, as well as generating text and speech.")


def question(path):
    subprocess.run(["espeak-ng", "-w", path, "What will the weather be like in Paris tomorrow morning?"], check=True)
    return path


def inputs(model_path, wav):
    from mindone_ext import Qwen2_5OmniProcessor
    from mindone_ext.utils.audio import load_audio

    processor = Qwen2_5OmniProcessor.from_pretrained(model_path)
    audio = load_audio(wav)
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                    {"role": "user", "content": [{"type": "audio", "audio": audio}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return processor(text=text, audio=[audio], return_tensors="np", padding=True), len(audio) / 16000


def turn_options(ap):
    """The turn's options (this bench's and bench/cold_start.py's): the checkpoint, the answer's length."""
    ap.add_argument("--model_path", default=None, help="a Qwen2.5-Omni folder (default: the bundled tiny checkpoint)")
    ap.add_argument("--text_tokens", type=int, default=24)
    ap.add_argument("--codec_tokens", type=int, default=100)
    ap.add_argument("--wav", help=argparse.SUPPRESS)  # the question, made by the parent process


def turn_settings(feed, args):
    """Our generate()'s arguments for the turn: greedy, exactly `--text_tokens` and `--codec_tokens` tokens."""
    return dict(feed, spk="Ethan", max_new_tokens=args.text_tokens, eos_token_id=[], talker_do_sample=False,
                talker_max_new_tokens=args.codec_tokens, seed=0)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 3)


def warm_answers(answer, runs):
    """Seconds of `runs` more answers and their median."""
    times = [timed(answer)[1] for _ in range(runs)]
    return dict(whole_warm_s=round(statistics.median(times), 3), whole_warm_runs_s=times)


def run_ours(args):
    start = time.perf_counter()
    from mindone_ext import Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(args.model_path)
    feed, question_s = inputs(args.model_path, args.wav)
    loaded = round(time.perf_counter() - start, 3)
    settings = turn_settings(feed, args)
    (_, wav), cold = timed(lambda: model.generate(**settings))
    warm = warm_answers(lambda: model.generate(**settings), args.warm_runs)
    first_stream = stream(model, settings)  # compiles the chunk windows' graphs
    streams = [stream(model, settings) for _ in range(args.warm_runs)]
    return dict(import_and_load_s=loaded, whole_cold_s=cold, **warm,
                **{key: statistics.median(s[key] for s in streams) for key in streams[0]},
                first_stream_total_s=first_stream["stream_total_s"], speech_s=round(len(wav) / 24000, 2),
                question_s=round(question_s, 2), vocoder_compiled=model.token2wav.vocoder.compiled)


def stream(model, settings):
    """Seconds to the first text token, the first audio chunk and the last event of one streamed answer."""
    from mindone_ext.models.qwen2_5_omni.streaming import AudioChunk, TextDelta

    start, first_text, first_audio, chunks = time.perf_counter(), None, None, 0
    for event in model.generate_stream(**settings):
        now = round(time.perf_counter() - start, 3)
        if isinstance(event, TextDelta) and first_text is None:
            first_text = now
        if isinstance(event, AudioChunk):
            first_audio, chunks = first_audio or now, chunks + 1
    return dict(stream_first_text_s=first_text, stream_first_audio_s=first_audio,
                stream_total_s=round(time.perf_counter() - start, 3), stream_chunks=chunks)


def reference_model(path):
    """The PyTorch reference on `path`, float32."""
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    # Random weights may emit codes past the DiT's table (the Talker's vocabulary is larger), on
    # which the reference's Token2Wav fails with an IndexError; they are dropped first, as ours does.
    token2wav, limit = model.token2wav.forward, model.config.token2wav_config.dit_config.num_embeds
    model.token2wav.forward = lambda code, *rest, **kw: token2wav(code[:, code[0] < limit], *rest, **kw)
    return model


def run_reference(args):
    start = time.perf_counter()
    import torch

    model = reference_model(args.model_path)
    feed, question_s = inputs(args.model_path, args.wav)
    feed = {k: torch.tensor(v) for k, v in feed.items()}
    loaded = round(time.perf_counter() - start, 3)

    def answer():
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(**feed, speaker="Ethan", thinker_max_new_tokens=args.text_tokens,
                                  thinker_do_sample=False, thinker_eos_token_id=None, talker_do_sample=False,
                                  talker_max_new_tokens=args.codec_tokens)

    (_, wav), cold = timed(answer)
    return dict(import_and_load_s=loaded, whole_cold_s=cold, **warm_answers(answer, args.warm_runs),
                speech_s=round(wav.numel() / 24000, 2),
                question_s=round(question_s, 2))


def run_voice_chatting(args):
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, os.path.join(ROOT, "examples", "qwen2_5_omni", "voice_chatting.py"), "--audio",
                   args.wav, "--output", os.path.join(tmp, "answer.wav")]
        if args.model_path != default_model():
            command += ["--model_path", args.model_path]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return dict(process_total_s=round(time.perf_counter() - start, 3))


def default_model():
    from mindone_ext.bundled import CHECKPOINT

    return CHECKPOINT


def child(args):
    run = run_ours if args.impl.startswith("ours") else {"reference": run_reference,
                                                             "voice_chatting": run_voice_chatting}[args.impl]
    emit(dict(bench="latency", impl=args.impl, text_tokens=args.text_tokens, codec_tokens=args.codec_tokens,
              model=os.path.basename(os.path.normpath(args.model_path)), device="CPU", dtype="float32", **run(args)))


def medians(records):
    """One implementation's processes as one record: each number their median (this machine's load
    moves a process's answers together, by up to ~1.5x between processes); the rest the first's."""
    numbers = {key for key, value in records[0].items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {key: round(statistics.median(r[key] for r in records), 3) if key in numbers else value
            for key, value in records[0].items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    turn_options(ap)
    ap.add_argument("--warm_runs", type=int, default=3, help="warm answers (whole and streamed) per implementation")
    ap.add_argument("--impls", default="ours_empty_store,ours,ours_store_off,reference,voice_chatting",
                    help="ours after ours_empty_store finds its graphs stored")
    ap.add_argument("--rounds", type=int, default=3,
                    help="processes of ours and of the reference, alternating (the summary takes their medians)")
    ap.add_argument("--impl", help=argparse.SUPPRESS)  # one child process
    args = ap.parse_args()
    args.model_path = args.model_path or default_model()
    if args.impl:
        return child(args)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    impls = args.impls.split(",")
    repeated = [impl for impl in impls if impl in ("ours", "reference")]
    sequence = ([impl for impl in impls if impl == "ours_empty_store"] + repeated * args.rounds
                + [impl for impl in impls if impl not in repeated and impl != "ours_empty_store"])
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        wav = question(os.path.join(tmp, "question.wav"))
        graphs = os.path.join(tmp, "graphs")  # this run's stored graphs, empty at first
        for impl in sequence:
            env = dict(os.environ, MINDONE_EXT_GRAPH_CACHE="off" if impl == "ours_store_off" else graphs)
            command = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--wav", wav, "--model_path",
                       args.model_path, "--text_tokens", str(args.text_tokens), "--codec_tokens", str(args.codec_tokens),
                       "--warm_runs", str(args.warm_runs)]
            out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if out.returncode:
                sys.exit(f"{impl} failed ({out.returncode}):\n{out.stderr[-3000:]}")
            runs.setdefault(impl, []).append(json.loads([line for line in out.stdout.splitlines()
                                                         if line.startswith("{")][-1]))
            emit(dict(runs[impl][-1], round=len(runs[impl])))
    records = {impl: medians(processes) for impl, processes in runs.items()}
    ours, reference = records.get("ours"), records.get("reference")
    summary = dict(bench="latency")
    if ours:
        summary["ratio_stream_total_vs_whole"] = round(ours["stream_total_s"] / ours["whole_warm_s"], 3)
        summary["ratio_cold_vs_warm"] = round(ours["whole_cold_s"] / ours["whole_warm_s"], 3)  # graphs stored
    if ours and records.get("ours_empty_store"):
        empty = records["ours_empty_store"]["whole_cold_s"]
        summary["ratio_cold_empty_store_vs_warm"] = round(empty / ours["whole_warm_s"], 3)
    if ours and reference:
        summary["ratio_first_audio_vs_reference_whole"] = round(ours["stream_first_audio_s"] / reference["whole_warm_s"], 3)
        summary["ratio_whole_vs_reference_whole"] = round(ours["whole_warm_s"] / reference["whole_warm_s"], 3)
        summary["same_speech_length"] = ours["speech_s"] == reference["speech_s"]
    emit(summary)


if __name__ == "__main__":
    main()
