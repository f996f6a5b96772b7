"""What a person at a terminal sees while something slow happens for the first time: a
progress bar while a checkpoint loads, a line while a graph compiles. Nothing in logs or pipes."""
import contextlib
import sys
import time


def progress(items, description, unit):
    """`items`, with a progress bar on standard error when it is a terminal."""
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit=unit, leave=False)


@contextlib.contextmanager
def compiling(what):
    """A line on standard error, when it is a terminal, while `what` compiles (a graph's first
    call for a shape takes seconds, later calls reuse it; they pass None). Erased when done."""
    if what is None or not sys.stderr.isatty():
        yield
        return
    start = time.perf_counter()
    sys.stderr.write(f"compiling {what} (first use of this shape) ...")
    sys.stderr.flush()
    try:
        yield
    finally:
        sys.stderr.write(f" {time.perf_counter() - start:.1f} s\r\033[K")
        sys.stderr.flush()
