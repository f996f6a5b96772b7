"""A file written whole or not at all: written under a temporary name beside its target and renamed,
so a killed or concurrent writer never leaves half a file under the target's name (the stored
graphs, the stored values, the native kernels' libraries)."""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def written_atomically(target, suffix=".partial"):
    """The path of a new temporary file beside `target` (its folder made if need be) for the block
    to write; renamed to `target` when the block ends without an error, removed otherwise. Making
    the folder or the file raises OSError (e.g. a read-only home) before the block runs."""
    folder = os.path.dirname(os.path.abspath(target))  # "" for a bare file name
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=suffix, dir=folder)
    os.close(handle)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
