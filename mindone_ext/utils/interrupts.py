"""Ctrl-C held while MindSpore compiles a graph, raised when the compile returns.

MindSpore's compiler calls back into Python to parse a function, and a KeyboardInterrupt raised
there is swallowed: the compile goes on and the program never sees the Ctrl-C (MindSpore 2.7.1,
a script with Python's own handler: tests/utils/test_graph_cache.py); raised elsewhere in a
compile, MindSpore logs it as its ERROR with a trace and writes its analysis into the working
directory (rank_0/om/). Held, the Ctrl-C surfaces as an ordinary KeyboardInterrupt right after the
graph is compiled (and stored whole), however many times it was pressed (raised at once, a second
one would be swallowed as well); Ctrl-\\ (SIGQUIT) still ends the process at once.

Held only in the main thread and only while Python's own SIGINT handler is installed: an
application's handler (the examples') is left to do what it does."""
import contextlib
import signal
import threading


@contextlib.contextmanager
def interrupts_held():
    """Within the block SIGINT is only noted; it is raised as KeyboardInterrupt when the block ends
    without another exception."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    noted = []
    signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if noted:
        raise KeyboardInterrupt
