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


def alternating_medians(fns, repeats, warmup=1):
    """{name: median seconds} of `fns` ({name: fn}) timed in turns, one run of each per round, so
    that a machine whose speed drifts during the run (this one's moves by 10-30% within minutes)
    slows them alike and their ratio stays fair."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def emit(record):
    print(json.dumps(record), flush=True)


def copy_weights(reference, ours, prefix=""):
    """Give our parameters the reference module's values (names match, minus `prefix`)."""
    from mindspore import Tensor

    state = reference.state_dict()
    for name, param in ours.parameters_and_names():
        param.set_data(Tensor(state[name[len(prefix):]].float().numpy()))
