"""Speech output, ours against the PyTorch reference on the same random weights: Talker decode
speed and Token2Wav's real-time factor.

    python bench/speech.py              # the 7B's talker and token2wav, 10 s of speech
    python bench/speech.py --tiny       # a smoke run

Talker: codec tokens/s after a 64-position prompt, greedy, no stop token (time of N tokens minus
time of 1, as in thinker_decode). Token2Wav: seconds to turn `seconds * 50` codec tokens (2 mel frames of 240 samples each at 24 kHz) into a
waveform (10 ODE steps with guidance, then the vocoder) divided by the audio's duration (below 1 =
faster than real time). Medians of repeats after a warm-up (ours compiles there).
"""
import argparse
import gc
import os
import sys
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_weights, emit, median_seconds  # noqa: E402

# Qwen2.5-Omni-7B's talker (its config.json); its token2wav is the config classes' default.
TALKER_7B = dict(embedding_size=3584, hidden_size=896, intermediate_size=18944, num_hidden_layers=24,
                 num_attention_heads=12, num_key_value_heads=4, head_dim=128, vocab_size=8448)
TALKER_TINY = dict(embedding_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=8448)


def configs(tiny):
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (Qwen2_5OmniTalkerConfig,
                                                                             Qwen2_5OmniToken2WavConfig)
    talker = Qwen2_5OmniTalkerConfig(**(TALKER_TINY if tiny else TALKER_7B), rope_scaling={
        "mrope_section": [2, 3, 3] if tiny else [16, 24, 24], "rope_type": "default", "type": "default"})
    token2wav = Qwen2_5OmniToken2WavConfig(
        dit_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, head_dim=16, emb_dim=16,
                        look_ahead_layers=[2], look_backward_layers=[0, 3], enc_emb_dim=16, enc_dim=32,
                        enc_channels=[32, 32, 32, 32, 96], enc_attention_channels=16, enc_se_channels=16)
        if tiny else {},
        bigvgan_config=dict(upsample_initial_channel=128, resblock_kernel_sizes=[3, 7],
                            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]]) if tiny else {})
    return talker, token2wav


def codes_per_second(t2w_config, sample_rate=24000):
    """Talker codec tokens per second of speech: each is `repeats` mel frames of the vocoder's hop."""
    return sample_rate / (t2w_config.dit_config.repeats * int(np.prod(t2w_config.bigvgan_config.upsample_rates)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--talker_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch
    from mindspore import Tensor
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as ref

    from mindone_ext.models.qwen2_5_omni import speech
    from mindone_ext.models.qwen2_5_omni.talker import Qwen2_5OmniTalkerForConditionalGeneration
    from mindone_ext.models.qwen2_5_omni.token2wav import Qwen2_5OmniToken2WavModel

    talker_config, t2w_config = configs(args.tiny)
    rng = np.random.default_rng(0)

    def measure_talkers():
        """Talker tokens/s for both; the models are freed on return (two 7B talkers and two
        token2wavs do not fit in memory at once)."""
        torch.manual_seed(0)
        ref_talker = ref.Qwen2_5OmniTalkerForConditionalGeneration._from_config(
            talker_config, attn_implementation="eager").eval()
        our_talker = Qwen2_5OmniTalkerForConditionalGeneration(talker_config)
        copy_weights(ref_talker, our_talker)
        e, length = talker_config.embedding_size, 64
        embeds = rng.standard_normal((1, length, e)).astype(np.float32) * 0.1
        reply = rng.standard_normal((1, args.talker_tokens + 2, e)).astype(np.float32) * 0.1
        text_ids = rng.integers(0, 1000, size=(1, length))
        codec_ids = np.full((1, length), talker_config.tts_codec_mask_token_id)
        positions = np.broadcast_to(np.arange(length), (3, 1, length)).copy()
        prompt = SimpleNamespace(embeds=Tensor(embeds), codec_ids=codec_ids, ready=lambda step: True,
                                 reply_at=lambda step: Tensor(reply[:, min(step, reply.shape[1] - 1)][:, None]))
        runner = speech.talker_runner(our_talker)

        def ours(n):
            settings = dict(speech.TALKER_DEFAULTS, max_new_tokens=n, do_sample=False, eos_token_id=())
            return list(speech.CodecLoop(our_talker, runner, prompt, positions, np.zeros((1, 1), np.int64), settings,
                                         0).codes())

        def reference(n):
            with torch.no_grad():
                return ref_talker.generate(
                    input_ids=torch.tensor(codec_ids), input_text_ids=torch.tensor(text_ids),
                    thinker_reply_part=torch.tensor(reply), inputs_embeds=torch.tensor(embeds),
                    attention_mask=torch.ones(1, length, dtype=torch.long), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, eos_token_id=None, pad_token_id=0, suppress_tokens=[ref_talker.codec_bos_token])

        speeds = {}
        for impl, talk in (("mindone_ext", ours), ("torch", reference)):
            one = median_seconds(lambda: talk(1), args.repeats)
            full = median_seconds(lambda: talk(args.talker_tokens), args.repeats)
            speeds[impl] = round((args.talker_tokens - 1) / max(full - one, 1e-9), 2)
        return speeds

    talker_speeds = measure_talkers()
    gc.collect()
    torch.manual_seed(0)
    ref_t2w = ref.Qwen2_5OmniToken2WavModel._from_config(t2w_config).eval().float()
    our_t2w = Qwen2_5OmniToken2WavModel(t2w_config)
    copy_weights(ref_t2w, our_t2w)
    codes = rng.integers(0, t2w_config.dit_config.num_embeds, size=(1, int(args.seconds * codes_per_second(t2w_config))))
    cond = rng.standard_normal((1, t2w_config.dit_config.enc_emb_dim)).astype(np.float32)
    ref_mel = rng.standard_normal((1, 300, t2w_config.dit_config.mel_dim)).astype(np.float32)

    def ours_t2w():
        return our_t2w(codes, cond, ref_mel, seed=0).asnumpy()

    def ref_t2w_run():
        with torch.no_grad():
            return ref_t2w(torch.tensor(codes), torch.tensor(cond), torch.tensor(ref_mel)).numpy()

    common = dict(config="tiny" if args.tiny else "qwen2.5-omni-7b", talker_tokens=args.talker_tokens,
                  speech_seconds=args.seconds, ode_steps=10, dtype="float32", device="CPU",
                  torch_threads=torch.get_num_threads())
    results = {impl: {"talker_tok_s": speed} for impl, speed in talker_speeds.items()}
    for impl, t2w in (("mindone_ext", ours_t2w), ("torch", ref_t2w_run)):
        results[impl]["token2wav_rtf"] = round(median_seconds(t2w, args.repeats) / args.seconds, 3)
        emit(dict(bench="speech", impl=impl, **results[impl], **common))
    emit(dict(bench="speech",
              ratio_talker_tok_s=round(results["mindone_ext"]["talker_tok_s"] / results["torch"]["talker_tok_s"], 3),
              ratio_token2wav_rtf=round(results["mindone_ext"]["token2wav_rtf"] / results["torch"]["token2wav_rtf"], 3)))


if __name__ == "__main__":
    main()
