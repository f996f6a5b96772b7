"""The tiny Qwen2.5-Omni config: every branch the full model has (grouped-query heads, several
audio windows, window and full attention ViT blocks, the DiT's look-ahead and look-back), at sizes a
CPU runs in seconds, with head sizes the Ascend flash kernel takes (16). The bundled checkpoint
(tools/tiny_checkpoint.py) and `python -m mindone_ext.doctor` are built from it."""
from .config import Qwen2_5OmniConfig

# The ids after the named specials that the Talker uses as text-side markers (tts pad/start/end)
# and the speakers' text bos ids; in the real vocabulary these are unnamed rows past the specials.
EXTRA_ROWS = 16


def tiny_config(ids, vocab, tie_word_embeddings=False, text_overrides=None):
    """A Qwen2.5-Omni config small enough for CI, with every branch the full model has:
    GQA, several audio windows, window and full attention ViT blocks, DiT look-ahead/back.
    `text_overrides` changes the Thinker's language model (e.g. a larger vocabulary, more layers)."""
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0, max_position_embeddings=4096,
                rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-6)
    text.update(text_overrides or {})
    thinker = dict(
        text_config=text,
        audio_config=dict(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                          encoder_ffn_dim=64, n_window=10, output_dim=64, max_source_positions=1500),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3]),
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        vision_token_id=ids["<|vision_pad|>"], user_token_id=ids["user_token"],
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    talker = dict(
        vocab_size=8448, embedding_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
        rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
        tts_text_start_token_id=vocab - EXTRA_ROWS + 1, tts_text_end_token_id=vocab - EXTRA_ROWS + 2,
        tts_text_pad_token_id=vocab - EXTRA_ROWS, tts_codec_start_token_id=8293, tts_codec_end_token_id=8294,
        tts_codec_pad_token_id=8292, tts_codec_mask_token_id=8296,
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
    )
    token2wav = dict(
        dit_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, head_dim=16, ff_mult=2,
                        emb_dim=16, block_size=24, look_ahead_layers=[2], look_backward_layers=[0, 3], repeats=2,
                        num_embeds=8193, mel_dim=80, enc_emb_dim=16, enc_dim=32, enc_channels=[32, 32, 32, 32, 96],
                        enc_kernel_sizes=[5, 3, 3, 3, 1], enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=16,
                        enc_res2net_scale=2, enc_se_channels=16),
        bigvgan_config=dict(mel_dim=80, upsample_initial_channel=128, resblock_kernel_sizes=[3, 7],
                            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]], upsample_rates=[5, 3, 2, 2, 2, 2],
                            upsample_kernel_sizes=[11, 7, 4, 4, 4, 4]),
    )
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav,
                             enable_audio_output=True)
