"""Helpers shared by the benchmark scripts: timing and the JSON-lines output form."""
import json
import statistics
import time


def median_seconds(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(record):
    print(json.dumps(record), flush=True)
