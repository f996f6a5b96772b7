"""The tiny random checkpoint a source checkout bundles (examples/qwen2_5_omni), and how long its
answers may run: its random weights have no reason to stop, so by default an answer there ends
after 64 text tokens and 100 codec tokens (2 s of speech), where a real checkpoint gets the
reference's 1024 and 4096."""
import os

CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "qwen2_5_omni",
                          "tiny-qwen2.5-omni")
THINKER_TOKENS, RELEASE_THINKER_TOKENS = 64, 1024
TALKER_TOKENS, RELEASE_TALKER_TOKENS = 100, 4096


def is_bundled(model_path, bundled=CHECKPOINT):
    """Whether `model_path` is the tiny checkpoint (`bundled`: where it is)."""
    return os.path.isdir(bundled) and os.path.isdir(model_path) and os.path.samefile(model_path, bundled)


def thinker_max_new_tokens(model_path, bundled=CHECKPOINT):
    """The default cap on an answer's text tokens for `model_path`."""
    return THINKER_TOKENS if is_bundled(model_path, bundled) else RELEASE_THINKER_TOKENS


def talker_max_new_tokens(model_path, bundled=CHECKPOINT):
    """The default cap on an answer's codec tokens for `model_path`."""
    return TALKER_TOKENS if is_bundled(model_path, bundled) else RELEASE_TALKER_TOKENS
