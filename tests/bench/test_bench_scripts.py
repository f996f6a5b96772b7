"""The benchmark scripts keep working and keep their output form (JSON lines: one per
implementation, then a summary of ratios). Timings are printed, never asserted."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_bench(script, *args):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_thinker_decode_bench_output_form():
    lines = run_bench("thinker_decode.py", "--tiny", "--repeats", "1", "--new_tokens", "8", "--context", "300")
    assert [r.get("impl") for r in lines] == ["mindone_ext", "torch", None]
    for record in lines[:2]:
        assert record["bench"] == "thinker_decode" and record["prefill_ms"] > 0 and record["decode_tok_s"] > 0
        assert record["prompt_len"] == 300
    assert lines[0]["cache_slots"] == 512
    assert lines[0]["kv_write_ms_per_token"] > 0 and lines[0]["kv_rewrite_ms_per_token"] > 0
    summary = lines[-1]
    assert summary["ratio_decode_tok_s"] > 0 and summary["greedy_tokens_identical"] is True


def test_encoders_bench_output_form():
    lines = run_bench("encoders.py", "--tiny", "--repeats", "1", "--seconds", "3", "--image_size", "112")
    assert [r.get("impl") for r in lines] == ["mindone_ext", "torch", None]
    assert all(r["audio_ms"] > 0 and r["vision_ms"] > 0 for r in lines[:2])
    assert lines[-1]["max_abs_diff_audio"] <= 1e-4 and lines[-1]["max_abs_diff_vision"] <= 1e-4


def test_linear_bench_output_form():
    lines = run_bench("linear.py", "--quick", "--repeats", "1")
    records, summary = lines[:-1], lines[-1]
    assert len(records) == 6 and {r["rows"] for r in records} == {4, 16, 100}
    for record in records:
        assert record["native"] == (record["rows"] >= 16)  # both quick shapes are large enough for it
        assert min(record["matmul_ms"], record["native_ms"], record["torch_ms"]) > 0
    assert summary["ratio_native_vs_matmul_median"] > 0 and summary["ratio_native_vs_torch_max"] > 0


def test_speech_bench_output_form():
    lines = run_bench("speech.py", "--tiny", "--repeats", "1", "--seconds", "1", "--talker_tokens", "6")
    assert [r.get("impl") for r in lines] == ["mindone_ext", "torch", None]
    assert all(r["talker_tok_s"] > 0 and r["token2wav_rtf"] > 0 for r in lines[:2])
    assert lines[-1]["ratio_talker_tok_s"] > 0 and lines[-1]["ratio_token2wav_rtf"] > 0


def test_streaming_bench_output_form():
    lines = run_bench("streaming.py", "--tiny", "--seconds", "1", "--text_tokens", "12")
    assert [r.get("mode") for r in lines] == ["whole", "stream", None]
    assert all(0 < r["first_audio_s"] <= r["total_s"] for r in lines[:2])
    assert lines[1]["chunks"] >= 2
    assert lines[-1]["same_length"] is True and lines[-1]["snr_db_stream_vs_whole"] >= 30


def test_latency_bench_output_form():
    lines = run_bench("latency.py", "--impls", "ours_empty_store,ours,reference", "--text_tokens", "4",
                      "--codec_tokens", "30", "--warm_runs", "2", "--rounds", "2")
    # ours and the reference alternate, one process per round
    assert [(r.get("impl"), r.get("round")) for r in lines] == [
        ("ours_empty_store", 1), ("ours", 1), ("reference", 1), ("ours", 2), ("reference", 2), (None, None)]
    empty, ours, reference, ours_2, reference_2, summary = lines
    assert empty["vocoder_compiled"] is ours["vocoder_compiled"] is True  # the tiny vocoder's graph fits
    assert empty["speech_s"] == ours["speech_s"] and summary["ratio_cold_empty_store_vs_warm"] > 0
    assert 0 < ours["stream_first_text_s"] <= ours["stream_first_audio_s"] <= ours["stream_total_s"]
    assert ours["whole_warm_s"] > 0 and reference["whole_warm_s"] > 0 and ours["stream_chunks"] >= 1
    # a process's warm figure is the median of its warm answers, each reported
    assert all(len(r["whole_warm_runs_s"]) == 2 for r in (ours, reference))
    assert ours["whole_warm_s"] == round(sum(ours["whole_warm_runs_s"]) / 2, 3)
    assert ours["speech_s"] == reference["speech_s"] > 0 and summary["same_speech_length"] is True
    assert summary["ratio_first_audio_vs_reference_whole"] > 0 and summary["ratio_stream_total_vs_whole"] > 0

    # the summary's ratios take each figure's median over the processes
    def median(key, *records):
        return round(statistics.median(r[key] for r in records), 3)

    assert summary["ratio_whole_vs_reference_whole"] == round(
        median("whole_warm_s", ours, ours_2) / median("whole_warm_s", reference, reference_2), 3)
    assert summary["ratio_cold_vs_warm"] == round(
        median("whole_cold_s", ours, ours_2) / median("whole_warm_s", ours, ours_2), 3)


def test_conversation_bench_output_form():
    """Ours keeping the Talker's cache prefills an answer's new part only; re-prefilling, the
    conversation and its 2 tokens; the reference answers the same conversations."""
    lines = run_bench("conversation.py", "--turns", "3", "--timed", "2", "--text_tokens", "4", "--codec_tokens", "20")
    kept, whole, reference, summary = lines
    assert [r.get("impl") for r in lines] == ["ours", "ours_whole_talker_prompt", "reference", None]
    assert kept["conversation_tokens"] == whole["conversation_tokens"] == reference["conversation_tokens"]
    assert whole["talker_tokens_prefilled"] == [n + 2 for n in whole["conversation_tokens"]]
    previous = kept["conversation_tokens"]  # the kept cache holds the previous answer's conversation
    assert kept["talker_tokens_prefilled"][1] == previous[1] + 2 - previous[0]
    assert all(r["whole_s"] > 0 for r in lines[:3]) and kept["first_audio_s"] > 0
    assert summary["ratio_first_audio_kept_vs_whole_talker_prompt"] > 0 and summary["ratio_whole_vs_reference_whole"] > 0


def test_cold_start_bench_output_form():
    lines = run_bench("cold_start.py", "--text_tokens", "4", "--codec_tokens", "30", "--answers", "2")
    graphs, summary = lines[:-1], lines[-1]
    assert summary["summary"] is True and summary["graphs"] == len(graphs) >= 10
    names = {g["graph"] for g in graphs}
    assert {"thinker_step", "talker_step", "dit_rk4_step", "bigvgan", "audio_stem"} <= names
    assert [g["extra_ms"] for g in graphs] == sorted((g["extra_ms"] for g in graphs), reverse=True)
    assert all(g["calls"] >= 1 and g["first_ms"] > 0 and len(g["input"]) >= 1 for g in graphs)
    assert summary["cold_s"] > 0 and summary["warm_s"] > 0
    # the sum of the rounded figures, in another order: equal to the rounding
    assert abs(summary["graphs_extra_s"] - sum(g["extra_ms"] for g in graphs) / 1e3) <= 1e-3


def test_compile_cache_probe_output_form():
    lines = run_bench("compile_cache_probe.py")
    assert [r["order"] for r in lines[:2]] == ["fg", "gf"] and lines[0]["correct"] is True
    # the probe reports what MindSpore does; the package keeps the cache off while it is unsafe
    assert lines[-1]["cache_is_safe"] == all(r["correct"] for r in lines[:2])


def test_finetune_bench_output_form():
    lines = run_bench("finetune.py", "--tiny", "--steps", "2", "--tokens", "300", "--answer_tokens", "32")
    assert [r.get("impl") for r in lines] == ["mindone_ext_compiled", "mindone_ext", "torch", None]
    assert all(r["seconds_per_step"] > 0 and r["peak_rss_gb"] > 0 for r in lines[:3])
    assert lines[-1]["ratio_eager_seconds_per_step"] > 0
    # same weights, same batch: the first step's loss agrees before any update, in both of ours
    assert lines[-1]["first_loss_diff"] <= 1e-3 and lines[-1]["ratio_seconds_per_step"] > 0


def test_serve_load_bench_answers_every_turn_and_frees_the_server():
    """3 clients on 2 answer slots and no queue, the batched engine: turns are refused as busy and
    retried; every turn is answered with its script's answer alone (no cross-talk), none hangs,
    and the server ends with no session, no cache and its memory back near where it was. (Each
    spoken turn costs seconds on CPU: the figures under heavier load are bench/serve_load.py's.)"""
    lines = run_bench("serve_load.py", "--clients", "3", "--turns", "1", "--scripts", "2", "--max_active", "2",
                      "--max_queue", "0", "--max_new_tokens", "4", "--talker_max_new_tokens", "10", "--backoff", "0.3",
                      "--rounds", "4", "--engines", "batched")
    (result,) = lines
    assert result["engine"] == "batched" and result["codec_tokens_per_s"] > 0
    assert result["answered"] == 12 and result["busy_refusals"] > 0  # 3 clients, 4 rounds
    assert (result["hung"], result["mismatched"], result["refused"]) == (0, 0, 0)
    assert (result["sessions_after"], result["caches_after"]) == (0, 0)
    # a round that meets a shape first compiles (or loads) a graph, which stays allocated (which
    # round meets which shapes depends on how its turns interleave and on what the run's store
    # holds: CI runs saw -0 +87 0 MB; graphs loaded in each of 3 rounds, +3 +8 +3; 10 graphs
    # compiled in the first round, +148 MB; 2 compiled, +122 MB). Compiled from source in a fresh
    # store, one graph added up to 270 MB (BigVGAN's), a 4-row Thinker prefill 146 MB, an RK4 step
    # ~50 MB (measured in the server). A leak adds in every round, those that met no new graph
    # too, which must add nothing; a round that met graphs adds at most what they hold
    rss = [result["rss_before_mb"]] + result["rss_after_mb"]
    graphs = [result["graphs_before"]] + result["graphs_after"]
    rounds = [(b - a, g - f) for a, b, f, g in zip(rss, rss[1:], graphs, graphs[1:])]
    assert all(added < 16 + 300 * compiled for added, compiled in rounds), rounds
    assert result["answer_p50_s"] >= result["first_audio_p50_s"] > 0 and result["pace"] == "burst"


@pytest.mark.parametrize("bad", [("--frame_seconds", "0"), ("--stagger", "-1")])
def test_serve_load_bench_refuses_bad_pacing_before_starting_a_server(bad):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "serve_load.py"), *bad], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--frame_seconds must hold a sample" in done.stderr, done.stderr[-2000:]
    assert not done.stdout  # no JSON line: nothing ran


def test_server_start_bench_output_form():
    """A warmed-up server's first client meets no graph for the first time; one started with
    --no_warmup builds them in that client's turn."""
    lines = run_bench("server_start.py", "--rounds", "1", "--max_active", "1", "--max_new_tokens", "4",
                      "--talker_max_new_tokens", "20")
    warmed, cold, summary = lines
    assert (warmed["warmup"], cold["warmup"]) == (True, False) and warmed["round"] == cold["round"] == 0
    assert warmed["graphs_met"] == 0 and warmed["graphs_at_start"] > 0, warmed
    assert cold["graphs_met"] > 0 and cold["graphs_at_start"] == 0, cold
    assert warmed["answer_samples"] == cold["answer_samples"] > 0
    assert summary["medians"]["warmup"]["first_audio_s"] == warmed["first_audio_s"]
    assert summary["ratio_first_audio_warmup_vs_not"] == round(warmed["first_audio_s"] / cold["first_audio_s"], 3)


@pytest.mark.parametrize("turn", [["--words", "150"], ["--audio_seconds", "30"], ["--words", "150", "--spoken"]],
                         ids=["typed", "audio", "spoken"])
def test_prefill_stall_bench_output_form(turn):
    lines = run_bench("prefill_stall.py", *turn, "--runs", "1")
    chunked, whole, summary = lines
    assert (chunked["policy"], whole["policy"]) == ("chunked", "whole") and whole["budget"] is None
    assert chunked["audio_seconds"] == whole["audio_seconds"] == (30 if "--audio_seconds" in turn else 0)
    assert chunked["spoken"] == whole["spoken"] == ("--spoken" in turn)
    assert chunked["turn_tokens"] == whole["turn_tokens"] > chunked["budget"]  # parts between rounds
    assert all(r["longest_gap_ms"] >= r["median_gap_ms"] > 0 and r["turn_s"] > 0 for r in (chunked, whole))
    assert summary["ratio_longest_gap_chunked_vs_whole"] == round(chunked["longest_gap_ms"] / whole["longest_gap_ms"], 3)


def test_media_bench_output_form(reference_env):
    lines = run_bench("media.py", "--minutes", "0.1", "--width", "320", "--height", "180", "--fps", "25")
    assert [r.get("impl") for r in lines] == ["mindone_ext", "qwen_omni_utils", None]
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in lines[:2])
    assert lines[0]["frames"] == lines[1]["frames"] == [12, 3, 252, 448]  # 6 s at 2 fps, up to 128 tokens
    assert all(r["processor_seconds"] > 0 for r in lines[:2])
    assert lines[0]["grid"] == lines[1]["grid"] == [6, 18, 32]
    summary = lines[-1]
    assert summary["same_shape"] and summary["same_sample_fps"] and summary["max_level_difference"] <= 1
    # the patches follow the frames: one level is 1 / (255 * std) ~ 0.015
    assert summary["same_grid"] and summary["patches_max_difference"] <= 0.02
    assert summary["ratio_processor_seconds"] == round(lines[0]["processor_seconds"] / lines[1]["processor_seconds"], 2)
