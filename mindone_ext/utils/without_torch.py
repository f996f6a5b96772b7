"""Programs that run no PyTorch model (the examples, the voice server) import transformers only for
its configurations, tokenizer and Whisper features; with torch installed (as for this project's
tests), importing transformers imports torch too: ~2.7 s of every start (the model and processor
modules: 3.65 s against 0.99 s, measured). USE_TORCH=0 makes transformers act as on a user's
machine, where torch is not a requirement: its Whisper log-mel features then come from its numpy
code, not its torch code (within ~3e-5 of each other on a spoken clip)."""
import os
import sys


def transformers_without_torch():
    """Set USE_TORCH=0 for transformers, unless the user set USE_TORCH; once transformers is
    imported, nothing changes. Call it before anything imports transformers."""
    if "transformers" not in sys.modules:
        os.environ.setdefault("USE_TORCH", "0")
