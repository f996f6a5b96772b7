"""Qwen2.5-Omni on MindSpore."""
import importlib
import logging

# Two warnings of transformers that concern nobody here: without PyTorch "Models won't be
# available" (its tokenizers and configurations are all this package takes from it), and
# Qwen2.5-Omni's own config's `mrope_section`, unknown to its generic rope check.
logging.getLogger("transformers").addFilter(lambda record: "None of PyTorch" not in record.getMessage())
logging.getLogger("transformers.modeling_rope_utils").addFilter(lambda record: "mrope_section" not in record.getMessage())

__all__ = ["Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniThinkerForConditionalGeneration", "Qwen2_5OmniProcessor",
           "process_mm_info"]
__version__ = "0.1.0"


def __getattr__(name):
    # imported on first use: `python -m mindone_ext.serve --help` need not load MindSpore
    if name in __all__:
        return getattr(importlib.import_module(".models.qwen2_5_omni", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
