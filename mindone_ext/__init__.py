"""Qwen2.5-Omni on MindSpore."""
import importlib
import logging

# transformers warns on import that without PyTorch "Models won't be available": true, and not
# news here (its tokenizers and configurations are all this package takes from it)
logging.getLogger("transformers").addFilter(lambda record: "None of PyTorch" not in record.getMessage())

__all__ = ["Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniProcessor", "process_mm_info"]
__version__ = "0.1.0"


def __getattr__(name):
    # imported on first use: `python -m mindone_ext.serve --help` need not load MindSpore
    if name in __all__:
        return getattr(importlib.import_module(".models.qwen2_5_omni", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
