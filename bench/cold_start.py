"""Where a new process's first answer spends the time later answers do not (latency.py's cold
answer, graphs stored): each stored graph's first call in the process against its later calls.

    python bench/cold_start.py                  # the bundled tiny checkpoint
    python bench/cold_start.py --model_path DIR

The turn is latency.py's (an espeak-ng question, `--text_tokens` text and `--codec_tokens` codec
tokens, greedy). A first process stores the graphs (utils/graph_cache.py, in a folder of this run);
a second one loads them and answers `--answers` times, every call of a loaded graph timed. MindSpore
builds a loaded graph's kernels at its first call, and a process's first graph and first
convolution also start its runtime and oneDNN: that is the cold answer's extra time.

JSON lines: one per loaded graph (its name and first input's shape, e.g. a prefill piece's width,
its calls, its first call and the median of its later calls in ms, and their difference
`extra_ms`; a graph called once counts whole; ECAPA is not called: the first process stored the
speaker's voice), largest extra first; then a summary: the cold answer, the warm one (median of
the later answers), the graphs' extra in all, and what is left of the cold answer's extra
(`other_extra_s`: Python's first paths, allocations)."""
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
from latency import default_model, inputs, question, turn_options, turn_settings  # noqa: E402


def timed_graphs():
    """Time every call of a loaded graph from now on -> {graph: (name, [first input's shape], [seconds per call])}."""
    from mindone_ext.utils import graph_cache

    calls, load, call = {}, graph_cache.StoredGraph._graph_cell, graph_cache.LoadedGraph.__call__

    def named_load(stored, path):
        loaded = load(stored, path)
        calls[loaded] = (stored.name, [], [])
        return loaded

    def timed_call(loaded, *args):
        start = time.perf_counter()
        out = call(loaded, *args)
        _, shape, times = calls[loaded]
        times.append(time.perf_counter() - start)
        shape[:] = shape or list(args[0].shape)
        return out

    graph_cache.StoredGraph._graph_cell, graph_cache.LoadedGraph.__call__ = named_load, timed_call
    return calls


def answer_times(args):
    """(seconds of each answer, the graph calls' timings) in this process."""
    calls = timed_graphs()
    from mindone_ext import Qwen2_5OmniForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(args.model_path)
    feed, _ = inputs(args.model_path, args.wav)
    settings = turn_settings(feed, args)
    answers = []
    for _ in range(args.answers):
        start = time.perf_counter()
        model.generate(**settings)
        answers.append(time.perf_counter() - start)
    return answers, list(calls.values())


def child(args):
    answers, calls = answer_times(args)
    graphs = []
    for name, shape, times in calls:
        later = statistics.median(times[1:]) if len(times) > 1 else 0.0
        graphs.append(dict(bench="cold_start", graph=name, input=shape, calls=len(times),
                           first_ms=round(times[0] * 1e3, 1), later_ms=round(later * 1e3, 2),
                           extra_ms=round((times[0] - later) * 1e3, 1)))
    for record in sorted(graphs, key=lambda g: -g["extra_ms"]):
        emit(record)
    warm = statistics.median(answers[1:])
    extra = sum(g["extra_ms"] for g in graphs) / 1e3
    emit(dict(bench="cold_start", summary=True, cold_s=round(answers[0], 3), warm_s=round(warm, 3),
              ratio_cold_vs_warm=round(answers[0] / warm, 3), graphs=len(graphs), graphs_extra_s=round(extra, 3),
              other_extra_s=round(answers[0] - warm - extra, 3)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    turn_options(ap)
    ap.add_argument("--answers", type=int, default=4, help="answers in the timed process (the first is cold)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.answers < 2:
        ap.error("--answers must be at least 2 (a cold answer and a warm one)")
    args.model_path = args.model_path or default_model()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        wav = question(os.path.join(tmp, "question.wav"))
        env = dict(os.environ, MINDONE_EXT_GRAPH_CACHE=os.path.join(tmp, "graphs"))
        command = [sys.executable, os.path.abspath(__file__), "--child", "--wav", wav, "--model_path", args.model_path,
                   "--text_tokens", str(args.text_tokens), "--codec_tokens", str(args.codec_tokens)]
        for answers in (2, args.answers):  # the first process stores the graphs, the second is measured
            out = subprocess.run(command + ["--answers", str(answers)], capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"the answering process failed ({out.returncode}):\n{out.stderr[-3000:]}")
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                emit(json.loads(line))


if __name__ == "__main__":
    main()
