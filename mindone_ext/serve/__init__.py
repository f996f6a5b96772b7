"""The voice-chat service: `python -m mindone_ext.serve --model_path ...` (see __main__.py and
docs/voice_service.md)."""
from .app import create_app
from .options import ServeOptions

__all__ = ["create_app", "ServeOptions"]
