"""The CPU's linear in its two layouts, timed where `exact_linear` chooses between them
(mindone_ext/nn/ops.py: FLIPPED_ROWS and the bounds beside it), against torch's linear.

    python bench/linear_layouts.py            # the encoders', decoders' and heads' shapes
    python bench/linear_layouts.py --quick    # two shapes, few rows

Each weight shape is timed in its own process. Prints one JSON line per (weight shape, rows): milliseconds (best of `--repeats`, compiled) of
x @ W.T (`transposed_ms`), of (W @ x.T).T (`flipped_ms`), of torch (`torch_ms`), which one
`exact_linear` takes (`flipped`), and a summary line: for the pairs where it flips, the median and
worst ratio flipped / transposed, and likewise where it does not (below 1: flipping is faster).
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

# (in, out): the 7B's audio and vision layers, the 0.5B and 7B decoders' projections, codec and vocabulary heads
SHAPES = [(1280, 1280), (1280, 5120), (5120, 1280), (1280, 3420), (3420, 1280), (896, 896), (896, 4864),
          (4864, 896), (3584, 3584), (3584, 18944), (18944, 3584), (896, 8448), (64, 151936), (896, 151936),
          (512, 512), (256, 256)]
ROWS = [1, 4, 8, 12, 16, 24, 32, 64, 100, 128, 192, 256, 384, 512]


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
    ratios = {True: [], False: []}
    for into, out in SHAPES[:2] if args.quick else SHAPES:
        command = [sys.executable, os.path.abspath(__file__), "--shape", f"{into},{out}", "--repeats", str(args.repeats)]
        done = subprocess.run(command + (["--quick"] if args.quick else []), capture_output=True, text=True, check=True)
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                ratios[record["flipped"]].append(record["flipped_ms"] / record["transposed_ms"])
                emit(record)
    import torch

    summary = dict(bench="linear_layouts", torch_threads=torch.get_num_threads())
    for chosen, name in ((True, "where_flipped"), (False, "where_not")):
        if ratios[chosen]:
            summary[f"ratio_flipped_vs_transposed_{name}_median"] = round(statistics.median(ratios[chosen]), 3)
            summary[f"ratio_flipped_vs_transposed_{name}_{'max' if chosen else 'min'}"] = round(
                (max if chosen else min)(ratios[chosen]), 3)
    emit(summary)


def time_shape(into, out, rows_list, repeats):
    """The records of one weight shape (out, into) at each of `rows_list`."""
    import torch
    import mindspore as ms
    from mindspore import Tensor, ops

    from mindone_ext.nn.ops import flipped

    by_x, by_w = ops.MatMul(transpose_b=True), ops.MatMul()

    def times_transposed(x, w):
        return by_x(x, w)

    def flipped_product(x, w):
        return by_w(w, x.T).T

    transposed, flip = ms.jit(times_transposed), ms.jit(flipped_product)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((out, into)).astype(np.float32)
    for rows in rows_list:
        x = rng.standard_normal((rows, into)).astype(np.float32)
        tx, tw, mx, mw = torch.from_numpy(x), torch.from_numpy(w), Tensor(x), Tensor(w)
        record = dict(bench="linear_layouts", in_features=into, out_features=out, rows=rows,
                      flipped=flipped(rows, (out, into)))
        for name, fn in (("transposed_ms", lambda: transposed(mx, mw).asnumpy()),
                         ("flipped_ms", lambda: flip(mx, mw).asnumpy()),
                         ("torch_ms", lambda: torch.nn.functional.linear(tx, tw))):
            record[name] = round(min(median_seconds(fn, 1) for _ in range(repeats)) * 1e3, 3)
        yield record


if __name__ == "__main__":
    main()
