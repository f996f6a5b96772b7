"""The CPU's linear layers: MindSpore's MatMul (x @ W.T) against the native kernel `exact_linear`
takes for large float32 weights (mindone_ext/nn/native_linear.py: oneDNN's sgemm on column slices),
and against torch's linear.

    python bench/linear.py            # the encoders', decoders', DiT's and heads' shapes
    python bench/linear.py --quick    # two shapes, few rows

Each weight shape is timed in its own process. Prints one JSON line per (weight shape, rows):
milliseconds per product (best of `--repeats`; compiled, PAIRS products there and back in one
graph, as a layer runs them) of MatMul (`matmul_ms`), of the kernel (`native_ms`), of torch
(`torch_ms`), whether `exact_linear` takes the kernel there (`native`), and a summary line: where
it does, the median and the worst ratio native / MatMul and native / torch (below 1: faster).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, median_seconds  # noqa: E402

# (in, out): the 7B's audio and vision layers, the 0.5B and 7B decoders' projections, the 7B DiT's,
# codec and vocabulary heads
SHAPES = [(1280, 1280), (1280, 5120), (5120, 1280), (1280, 3420), (3420, 1280), (896, 896), (896, 4864),
          (4864, 896), (3584, 3584), (3584, 18944), (18944, 3584), (1024, 1024), (896, 8448), (64, 151936),
          (896, 151936), (512, 512), (256, 256)]
ROWS = [1, 4, 8, 15, 16, 32, 64, 100, 128, 256, 512, 1024, 2064]
PAIRS = 3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shape", help="in,out: time this weight shape only, in this process (no summary)")
    args = ap.parse_args()
    rows_list = [4, 16, 100] if args.quick else ROWS
    if args.shape:
        into, out = map(int, args.shape.split(","))
        for record in time_shape(into, out, rows_list, args.repeats):
            emit(record)
        return
    # each shape in its own process: MindSpore keeps what every compiled graph allocated (all
    # shapes in one process grew past 24 GB)
    ratios = {"matmul": [], "torch": []}
    for into, out in SHAPES[:2] if args.quick else SHAPES:
        command = [sys.executable, os.path.abspath(__file__), "--shape", f"{into},{out}", "--repeats", str(args.repeats)]
        done = subprocess.run(command + (["--quick"] if args.quick else []), capture_output=True, text=True, check=True)
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record["native"]:
                    for other in ratios:
                        ratios[other].append(record["native_ms"] / record[f"{other}_ms"])
                emit(record)
    import torch

    summary = dict(bench="linear", torch_threads=torch.get_num_threads())
    for other, values in ratios.items():
        if values:
            summary[f"ratio_native_vs_{other}_median"] = round(statistics.median(values), 3)
            summary[f"ratio_native_vs_{other}_max"] = round(max(values), 3)
    emit(summary)


def time_shape(into, out, rows_list, repeats):
    """The records of one weight shape (out, into) at each of `rows_list`."""
    import torch
    import mindspore as ms
    from mindspore import Tensor, ops

    from mindone_ext.nn import native_linear

    native_linear.enable()
    if native_linear.KERNELS is None:
        sys.exit("the native linear kernel is not available here (native kernels off, or no compiler or oneDNN)")
    times_transposed, kernel = ops.MatMul(transpose_b=True), native_linear.KERNELS.plain

    # PAIRS products there and back (W, then W2 of the transposed shape) in one graph, as a layer
    # runs them among other kernels: one product a graph, MatMul and the kernel timed about even
    def by_matmul(x, w, w2):
        for _ in range(PAIRS):
            x = times_transposed(times_transposed(x, w), w2)
        return x

    def by_kernel(x, w, w2):
        for _ in range(PAIRS):
            x = kernel(kernel(x, w), w2)
        return x

    def by_torch(x, w, w2):
        for _ in range(PAIRS):
            x = torch.nn.functional.linear(torch.nn.functional.linear(x, w), w2)
        return x

    matmul, native = ms.jit(by_matmul), ms.jit(by_kernel)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((out, into)) / into ** 0.5).astype(np.float32)
    w2 = (rng.standard_normal((into, out)) / out ** 0.5).astype(np.float32)
    for rows in rows_list:
        x = rng.standard_normal((rows, into)).astype(np.float32)
        tx, tw, tw2 = (torch.from_numpy(a) for a in (x, w, w2))
        mx, mw, mw2 = (Tensor(a) for a in (x, w, w2))
        record = dict(bench="linear", in_features=into, out_features=out, rows=rows,
                      native=native_linear.takes(rows, mw, ms.float32))
        for name, fn in (("matmul_ms", lambda: matmul(mx, mw, mw2).asnumpy()),
                         ("native_ms", lambda: native(mx, mw, mw2).asnumpy()),
                         ("torch_ms", lambda: by_torch(tx, tw, tw2))):
            record[name] = round(min(median_seconds(fn, 1) for _ in range(repeats)) * 1e3 / (2 * PAIRS), 3)
        yield record


if __name__ == "__main__":
    main()
