"""Is MindSpore's compile cache safe for this project's graphs? (Run again after upgrading MindSpore.)

    python bench/compile_cache_probe.py

Two tiny jit functions, f(x) = 2x + 1 and g(x) = x - 5, compiled in two new processes that share
one cache folder (`enable_compile_cache=True, compile_cache_path=...`): the first compiles f then
g, the second g then f. A sound cache gives both processes the same results. MindSpore 2.7.1 on
CPU keys cached graphs by the order a process compiled them, so the second process runs f's
graph for g: its results are wrong, silently (only a "correctness risks" warning in the log).
Our graphs compile in an order set by the prompts a process meets, so the cache stays off.

Prints one JSON line per process and a summary with `cache_is_safe`.
"""
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json
import sys
import numpy as np
import mindspore as ms
ms.set_context(enable_compile_cache=True, compile_cache_path=sys.argv[1])

@ms.jit
def f(x):
    return x * 2 + 1

@ms.jit
def g(x):
    return x - 5

x = ms.Tensor(np.ones(3, np.float32))
results = {name: float({"f": f, "g": g}[name](x).asnumpy()[0]) for name in sys.argv[2]}
print(json.dumps(results))
"""
EXPECTED = {"f": 3.0, "g": -4.0}


def main():
    with tempfile.TemporaryDirectory() as tmp:
        child, cache = os.path.join(tmp, "child.py"), os.path.join(tmp, "cache")
        with open(child, "w") as f:
            f.write(CHILD)  # a file: MindSpore compiles from the source it reads back
        records = []
        for order in ("fg", "gf"):
            out = subprocess.run([sys.executable, child, cache, order], capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            records.append(dict(bench="compile_cache_probe", order=order, got=got, expected=EXPECTED,
                                correct=got == EXPECTED))
            print(json.dumps(records[-1]), flush=True)
    import mindspore

    print(json.dumps(dict(bench="compile_cache_probe", mindspore=mindspore.__version__,
                          cache_is_safe=all(r["correct"] for r in records))))


if __name__ == "__main__":
    main()
