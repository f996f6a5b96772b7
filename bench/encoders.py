"""Audio and vision encoders, ours against the PyTorch reference on the same random weights.

    python bench/encoders.py           # the 7B's encoder configs: 30 s of audio, one 448x448 image
    python bench/encoders.py --tiny    # a few-second smoke run

Prints one JSON line per implementation (audio_ms, vision_ms: medians of repeats after a warm-up,
ours and the reference timed in turns) and a summary line with ratios ours / reference (below 1 =
faster).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import alternating_medians, copy_weights, emit  # noqa: E402


def configs(tiny):
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (Qwen2_5OmniAudioEncoderConfig,
                                                                             Qwen2_5OmniVisionEncoderConfig)
    if not tiny:  # Qwen2.5-Omni-7B's encoders (the vision class defaults differ from the release)
        return (Qwen2_5OmniAudioEncoderConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                                              encoder_ffn_dim=5120, n_window=100, output_dim=3584),
                Qwen2_5OmniVisionEncoderConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                               out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31],
                                               window_size=112))
    return (Qwen2_5OmniAudioEncoderConfig(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                                          output_dim=64),
            Qwen2_5OmniVisionEncoderConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                           out_hidden_size=64, fullatt_block_indexes=[1]))



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--image_size", type=int, default=448)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as ref

    from mindone_ext.models.qwen2_5_omni.audio_encoder import Qwen2_5OmniAudioEncoder
    from mindone_ext.models.qwen2_5_omni.vision_encoder import Qwen2_5OmniVisionEncoder

    audio_config, vision_config = configs(args.tiny)
    torch.manual_seed(0)
    ref_audio = ref.Qwen2_5OmniAudioEncoder._from_config(audio_config, attn_implementation="eager").eval()
    ref_vision = ref.Qwen2_5OmniVisionEncoder._from_config(vision_config, attn_implementation="eager").eval()
    our_audio, our_vision = Qwen2_5OmniAudioEncoder(audio_config), Qwen2_5OmniVisionEncoder(vision_config)
    copy_weights(ref_audio, our_audio)
    copy_weights(ref_vision, our_vision)

    rng = np.random.default_rng(0)
    frames = int(args.seconds * 100)  # 10 ms hop
    mel = rng.standard_normal((audio_config.num_mel_bins, frames)).astype(np.float32)
    side = args.image_size // vision_config.patch_size
    grid = np.array([[1, side, side]])
    pixels = rng.standard_normal((side * side, 3 * 2 * vision_config.patch_size ** 2)).astype(np.float32)
    lens = np.array([frames])

    def ref_audio_run():
        with torch.no_grad():
            cnn, _ = ref_audio._get_feat_extract_output_lengths(torch.tensor(lens))
            return ref_audio(torch.tensor(mel), feature_lens=torch.tensor(lens), aftercnn_lens=cnn).last_hidden_state.numpy()

    def ref_vision_run():
        with torch.no_grad():
            return ref_vision(torch.tensor(pixels), grid_thw=torch.tensor(grid)).numpy()

    runs = {"mindone_ext": (lambda: our_audio(mel, lens).asnumpy(), lambda: our_vision(pixels, grid).asnumpy()),
            "torch": (ref_audio_run, ref_vision_run)}
    diffs = {"audio": float(np.abs(runs["mindone_ext"][0]() - ref_audio_run()).max()),
             "vision": float(np.abs(runs["mindone_ext"][1]() - ref_vision_run()).max())}
    common = dict(config="tiny" if args.tiny else "qwen2.5-omni-7b", audio_seconds=args.seconds,
                  image=f"{args.image_size}x{args.image_size}", dtype="float32", device="CPU",
                  torch_threads=torch.get_num_threads())
    results = {impl: {} for impl in runs}
    for part, index in (("audio_ms", 0), ("vision_ms", 1)):  # ours and the reference in turns
        medians = alternating_medians({impl: fns[index] for impl, fns in runs.items()}, args.repeats)
        for impl, seconds in medians.items():
            results[impl][part] = round(seconds * 1e3, 1)
    for impl in runs:
        emit(dict(bench="encoders", impl=impl, **results[impl], **common))
    emit(dict(bench="encoders", ratio_audio_ms=round(results["mindone_ext"]["audio_ms"] / results["torch"]["audio_ms"], 3),
              ratio_vision_ms=round(results["mindone_ext"]["vision_ms"] / results["torch"]["vision_ms"], 3),
              max_abs_diff_audio=diffs["audio"], max_abs_diff_vision=diffs["vision"]))


if __name__ == "__main__":
    main()
