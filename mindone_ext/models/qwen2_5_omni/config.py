"""Configs are the reference's own config classes from transformers (pure Python, no torch):
one source of truth for hyper-parameters."""
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (  # noqa: F401
    Qwen2_5OmniConfig,
    Qwen2_5OmniTalkerConfig,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniToken2WavConfig,
)

from ...utils.checkpoint import CheckpointError


def load_config(folder):
    try:
        config = Qwen2_5OmniConfig.from_json_file(folder.config_path)
    except (ValueError, OSError, TypeError) as e:
        raise CheckpointError(f"{folder.config_path}: cannot be read as a Qwen2.5-Omni config ({e})") from None
    model_type = getattr(config, "model_type", None)
    raw = folder.read_json("config.json")
    if raw.get("model_type") != "qwen2_5_omni":
        raise CheckpointError(f"{folder.config_path}: model_type is {raw.get('model_type')!r}, "
                              f"expected 'qwen2_5_omni' ({model_type})")
    return config
