"""MindSpore warns "... has been compiled again" whenever a new function object compiles code it
compiled before. Our compiled steps are built per model (each decoder's step, each Token2Wav's
DiT block), so a second model in a process compiles them again by design: those warnings, and
only those about this package's files, are dropped."""
import os

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_installed = []


def quiet_expected_recompiles():
    if _installed:
        return
    from mindspore import log

    get = getattr(log, "_get_logger", None)  # MindSpore's own logger (its name holds the process id)
    if get is not None:
        get().addFilter(lambda record: not ("compiled again" in record.getMessage() and PACKAGE in record.getMessage()))
        _installed.append(True)
