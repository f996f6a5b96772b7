"""The voice-chat service: `python -m mindone_ext.serve --model_path ...` (see __main__.py and
docs/voice_service.md)."""
import importlib

__all__ = ["create_app", "ServeOptions"]


def __getattr__(name):
    if name == "create_app":  # loads aiohttp and MindSpore: only when asked for
        return importlib.import_module(".app", __name__).create_app
    if name == "ServeOptions":
        return importlib.import_module(".options", __name__).ServeOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
