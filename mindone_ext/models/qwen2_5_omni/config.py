"""Configs are the reference's own config classes from transformers (pure Python, no torch):
one source of truth for hyper-parameters. A config is checked before any model is built from it:
sizes must be positive integers within bounds no real checkpoint comes near (a corrupt or hostile
config.json must not allocate terabytes or divide by zero), and the heads must divide evenly."""
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (  # noqa: F401
    Qwen2_5OmniConfig,
    Qwen2_5OmniTalkerConfig,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniToken2WavConfig,
)

from ...utils.checkpoint import CheckpointError

WIDTH, LAYERS, HEADS, VOCAB, POSITIONS = 1 << 16, 1024, 1024, 1 << 21, 1 << 21
DECODER_SIZES = {"vocab_size": VOCAB, "hidden_size": WIDTH, "intermediate_size": 1 << 18,
                 "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
                 "max_position_embeddings": POSITIONS}
SIZES = {
    "thinker_config.text_config": DECODER_SIZES,
    "thinker_config.audio_config": {"d_model": WIDTH, "encoder_layers": LAYERS, "encoder_attention_heads": HEADS,
                                    "encoder_ffn_dim": 1 << 18, "num_mel_bins": 1024, "n_window": 1 << 14,
                                    "max_source_positions": 1 << 16, "output_dim": WIDTH},
    "thinker_config.vision_config": {"hidden_size": WIDTH, "depth": LAYERS, "num_heads": HEADS,
                                     "intermediate_size": 1 << 18, "out_hidden_size": WIDTH, "patch_size": 1024,
                                     "spatial_merge_size": 64, "temporal_patch_size": 64, "window_size": 1 << 16,
                                     "in_channels": 16},
    "talker_config": dict(DECODER_SIZES, embedding_size=WIDTH),
    "token2wav_config.dit_config": {"hidden_size": WIDTH, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                                    "head_dim": WIDTH, "mel_dim": 1024, "block_size": 1 << 14, "num_embeds": VOCAB,
                                    "emb_dim": WIDTH, "enc_dim": WIDTH, "enc_emb_dim": WIDTH, "ff_mult": 64,
                                    "repeats": 64, "max_position_embeddings": POSITIONS},
    "token2wav_config.bigvgan_config": {"mel_dim": 1024, "upsample_initial_channel": WIDTH},
}
HEAD_PAIRS = {"thinker_config.text_config": ("num_attention_heads", "num_key_value_heads"),
              "talker_config": ("num_attention_heads", "num_key_value_heads")}


def load_config(folder):
    try:
        config = Qwen2_5OmniConfig.from_json_file(folder.config_path)
    except (ValueError, OSError, TypeError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{folder.config_path}: cannot be read as a Qwen2.5-Omni config ({e})") from None
    raw = folder.read_json("config.json")
    if not isinstance(raw, dict) or raw.get("model_type") != "qwen2_5_omni":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{folder.config_path}: model_type is {found!r}, expected 'qwen2_5_omni'")
    check_sizes(config, folder.config_path)
    return config


def check_sizes(config, where):
    problems = []
    for path, limits in SIZES.items():
        sub = config
        for part in path.split("."):
            sub = getattr(sub, part)
        for name, high in limits.items():
            value = getattr(sub, name, None)
            if value is None and name in ("head_dim", "num_key_value_heads"):
                continue  # optional: derived from the others
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                problems.append(f"{path}.{name} = {value!r} (expected an integer in [1, {high}])")
        if path in HEAD_PAIRS and not problems:
            heads, kv = (getattr(sub, n) for n in HEAD_PAIRS[path])
            if kv and heads % kv:
                problems.append(f"{path}: {heads} attention heads are not a multiple of {kv} key/value heads")
            if not getattr(sub, "head_dim", None) and sub.hidden_size % heads:
                problems.append(f"{path}: hidden_size {sub.hidden_size} is not a multiple of {heads} heads")
    if problems:
        raise CheckpointError(f"{where}: sizes out of range:\n  " + "\n  ".join(problems))
