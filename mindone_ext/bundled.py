"""The tiny random checkpoint a source checkout bundles (examples/qwen2_5_omni), and how long its
spoken answers may run: its random Talker has no reason to stop, so 100 codec tokens (2 s of
speech) by default there, where a real checkpoint gets 4096."""
import os

CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "qwen2_5_omni",
                          "tiny-qwen2.5-omni")
TALKER_TOKENS, RELEASE_TALKER_TOKENS = 100, 4096


def talker_max_new_tokens(model_path, bundled=CHECKPOINT):
    """The default cap on codec tokens for `model_path` (`bundled`: where the tiny checkpoint is)."""
    is_bundled = os.path.isdir(bundled) and os.path.isdir(model_path) and os.path.samefile(model_path, bundled)
    return TALKER_TOKENS if is_bundled else RELEASE_TALKER_TOKENS
