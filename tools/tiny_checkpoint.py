"""Build a tiny random Qwen2.5-Omni checkpoint folder in the exact Hugging Face layout.

The weights come from the PyTorch reference (`Qwen2_5OmniForConditionalGeneration(config)
.save_pretrained(...)`, sharded), re-initialised so activations and logits are O(0.1-1) rather
than the near-uniform outputs of the reference's small-std init. Next to them: a byte-level BPE
tokenizer trained here that carries every special token of the real one at the ids the config
uses, the chat template, the processor configs, a generation config and spk_dict.pt.

    python tools/tiny_checkpoint.py OUT_DIR [--seed 0] [--shard-size 200KB] [--tied]

Needs torch (the reference); the folder it writes does not.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from mindone_ext.models.qwen2_5_omni.tiny_config import EXTRA_ROWS, tiny_config

# Special tokens in the real tokenizer's order: ids follow the byte-level vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
    "<|IMAGE|>", "<|VIDEO|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
EXTRA_SPECIAL_TOKENS = {
    "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}

CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech.",
    "You are a helpful assistant. Hello! How are you today? What is in this picture? Please describe the audio.",
    "Transcribe the speech into text. Translate it into English. What sound is this? The quick brown fox "
    "jumps over the lazy dog. 1 + 1 = 2, 3 * 4 = 12, x^2 + y^2 = z^2.",
    "system user assistant image video audio music speech question answer the of and to in is that it for",
]
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")


def build_tokenizer(vocab_size=400):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)  # first, so their ids follow the vocabulary in order
    fast = Qwen2TokenizerFast(tokenizer_object=tok, errors="replace", clean_up_tokenization_spaces=False,
                              model_max_length=32768, extra_special_tokens=EXTRA_SPECIAL_TOKENS,
                              eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
                              additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def reinitialise(model, seed):
    """Weights with O(0.1-1) activations: matrices and conv kernels ~ N(0, 1/fan_in), embedding
    tables ~ N(0, 1), biases ~ N(0, 0.1^2), norm scales and snake parameters ~ 1 + N(0, 0.1^2);
    the vocoder's last conv is scaled down (x0.02) so the waveform stays inside its [-1, 1] clamp."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.Embedding):
                    value = torch.randn(p.shape, generator=g)
                elif p.ndim >= 2:
                    value = torch.randn(p.shape, generator=g) * int(np.prod(p.shape[1:])) ** -0.5
                    if module_name.endswith("conv_post"):
                        value *= 0.02
                elif name == "bias":
                    value = torch.randn(p.shape, generator=g) * 0.1
                else:
                    value = 1.0 + torch.randn(p.shape, generator=g) * 0.1
                p.copy_(value)


def processor_configs():
    from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor

    audio = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300,
                                    n_fft=400, padding_value=0.0, return_attention_mask=True).to_dict()
    image = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                  merge_size=2).to_dict()
    pre = {k: v for k, v in {**audio, **image}.items() if k not in ("mel_filters", "size")}
    pre.update(feature_extractor_type="WhisperFeatureExtractor", image_processor_type="Qwen2VLImageProcessor",
               processor_class="Qwen2_5OmniProcessor")
    video = {k: image[k] for k in ("do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                                   "image_std", "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size",
                                   "min_pixels", "max_pixels")}
    video.update(video_processor_type="Qwen2VLVideoProcessor", processor_class="Qwen2_5OmniProcessor",
                 min_frames=4, max_frames=768, fps=2.0)
    return pre, video


def speakers(config, ids, seed):
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    dit = config.token2wav_config.dit_config
    vocab = config.thinker_config.text_config.vocab_size
    return {
        name: {"cond": torch.randn(1, dit.enc_emb_dim, generator=g),
               "ref_mel": torch.randn(1, 60, dit.mel_dim, generator=g),
               "bos_token": vocab - EXTRA_ROWS + 4 + i}
        for i, name in enumerate(["Chelsie", "Ethan"])
    }


def build(out_dir, seed=0, shard_size="200KB", tie_word_embeddings=False, dtype="float32", text_overrides=None,
          safe_serialization=True):
    """Write the folder; returns its path. The folder appears complete or not at all.
    `dtype="bfloat16"` stores the weights as the official release does (half the size);
    `safe_serialization=False` writes PyTorch .bin files, as older checkpoints have."""
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    out_dir = os.path.abspath(out_dir)
    work = tempfile.mkdtemp(prefix=".tiny-", dir=os.path.dirname(out_dir) or ".")
    os.chmod(work, 0o755)
    try:
        tokenizer = build_tokenizer()
        ids = dict(tokenizer.get_vocab(), user_token=tokenizer.encode("user")[0])
        vocab = len(tokenizer) + EXTRA_ROWS
        config = tiny_config(ids, vocab, tie_word_embeddings, text_overrides)
        torch.manual_seed(seed)
        model = Qwen2_5OmniForConditionalGeneration(config).eval()
        reinitialise(model, seed)
        model.to(getattr(torch, dtype))
        model.save_pretrained(work, max_shard_size=shard_size, safe_serialization=safe_serialization)
        tokenizer.save_pretrained(work)
        pre, video = processor_configs()
        for name, content in (("preprocessor_config.json", pre), ("video_preprocessor_config.json", video),
                              ("chat_template.json", {"chat_template": CHAT_TEMPLATE}),
                              ("generation_config.json", {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                                                          "pad_token_id": ids["<|endoftext|>"]})):
            with open(os.path.join(work, name), "w") as f:
                json.dump(content, f, indent=2)
        torch.save(speakers(config, ids, seed), os.path.join(work, "spk_dict.pt"))
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    finally:
        if os.path.exists(work):
            shutil.rmtree(work)
    return out_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", default="200KB")
    ap.add_argument("--tied", action="store_true", help="tie the thinker's lm_head to its embeddings")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--overwrite", action="store_true", help="replace out_dir when it exists")
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mindone_ext.utils.export import ExportError, parse_size

    try:
        parse_size(a.shard_size)
    except ExportError as e:
        sys.exit(f"error: --shard-size: {e}")
    if os.path.exists(a.out_dir) and not a.overwrite:
        sys.exit(f"error: {a.out_dir} already exists; pass --overwrite to replace it")
    print(build(a.out_dir, a.seed, a.shard_size, a.tied, a.dtype))


if __name__ == "__main__":
    main()
