"""Streaming speech against whole answers: time to the first audio and total time.

    python bench/streaming.py             # 0.5B-shaped thinker, the 7B's talker and token2wav, 10 s answer
    python bench/streaming.py --tiny      # a smoke run

Same model, same random weights, same greedy settings: `generate(return_audio=True)` (the whole
answer: text, then codec tokens, then Token2Wav) against `generate_stream` (Thinker and Talker in
lockstep, Token2Wav chunk by chunk). "First audio" is when the first waveform samples are in hand:
the end of `generate` for the whole answer, the first AudioChunk when streaming. One timed run of
each after a warm-up that compiles the graphs the timed answer runs (`warm_up`: the decoders at
the timed answer's cache sizes, Token2Wav at its frame counts), as a server's warm-up does. The
talker and thinker never stop early (no stop tokens), so the answer is exactly `--seconds` long.
Each mode runs in its own process (same seeded weights): the compiled graphs of both at the 7B's
size do not fit in 24 GB together.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402
from speech import TALKER_7B, TALKER_TINY, codes_per_second, configs  # noqa: E402
from thinker_decode import build_config  # noqa: E402


def random_weights(model, seed):
    """Every parameter drawn N(0, 0.02), norms' weights 1: the speed of a real checkpoint, no file."""
    from mindspore import Tensor

    rng = np.random.default_rng(seed)
    for name, param in model.parameters_and_names():
        if name.endswith("inv_freq"):
            continue
        norm = "norm" in name and name.endswith("weight") and len(param.shape) == 1
        values = np.ones(param.shape) if norm else rng.standard_normal(param.shape) * 0.02
        param.set_data(Tensor(values.astype(np.float32)))


def build_model(tiny):
    import mindspore as ms

    from mindone_ext import Qwen2_5OmniForConditionalGeneration
    from mindone_ext.models.qwen2_5_omni.speakers import Speaker

    config = build_config("tiny" if tiny else "qwen2.5-0.5b")
    thinker = config.thinker_config.text_config
    thinker.vocab_size = 151936  # the Talker reads the tts special tokens (ids near 151860) through it
    talker = dict(TALKER_TINY if tiny else TALKER_7B, embedding_size=thinker.hidden_size,
                  rope_scaling={"mrope_section": [2, 3, 3] if tiny else [16, 24, 24], "rope_type": "default",
                                "type": "default"})
    config.talker_config = type(config.talker_config)(**talker)
    config.token2wav_config = configs(tiny)[1]
    config.enable_audio_output = True
    model = Qwen2_5OmniForConditionalGeneration(config, ms.float32, enable_audio_output=True)
    random_weights(model, 0)
    dit = config.token2wav_config.dit_config
    rng = np.random.default_rng(1)
    model.speakers = {"Bench": Speaker(rng.standard_normal((1, dit.enc_emb_dim)).astype(np.float32),
                                       rng.standard_normal((1, 300, dit.mel_dim)).astype(np.float32), 151672)}
    return model


def warm_up(model, settings, mode, codes, text_tokens=4):
    """Compile the graphs the timed answer of `mode` runs, as a server's warm-up has before its
    first client. The decoders' steps: the Talker's cache is sized by its max_new_tokens (a
    warm-up answer of a few codes compiled a 256-slot step, and the timed 10 s answer then
    compiled its 1024-slot one, ~30 s at the 7B's shape, measured), so a streamed answer with the
    same settings, closed after its first text tokens (the Talker has prefilled and taken its
    first steps). Token2Wav's: its graphs depend on the frames solved, not on the ODE's steps, so
    `codes` random codec tokens go through the mode's path (the whole answer's one solve, or the
    stream's windows with the codes arriving one by one) with a single RK4 step."""
    from mindone_ext.models.qwen2_5_omni.token2wav_stream import Token2WavStream

    events = model.generate_stream(**settings)
    for _ in zip(range(text_tokens), events):
        pass
    events.close()
    voice, token2wav = model.speakers[settings["spk"]], model.token2wav
    random_codes = np.random.default_rng(3).integers(0, token2wav.code2wav_dit_model.num_embeds - 1, size=codes)
    if mode == "whole":
        token2wav(random_codes[None], voice.cond, voice.ref_mel, num_steps=2, seed=0)
    else:
        wave = Token2WavStream(token2wav, voice.cond, voice.ref_mel, num_steps=2, seed=0)
        for code in random_codes:
            wave.push([code])
        wave.finish()


def run_mode(args):
    """One timed answer in this process; prints a JSON line and saves the waveform for comparison."""
    from mindone_ext.models.qwen2_5_omni.streaming import AudioChunk

    model = build_model(args.tiny)
    codes = int(args.seconds * codes_per_second(model.config.token2wav_config))
    ids = np.random.default_rng(2).integers(0, 1000, size=(1, 32))

    def settings(n_codes):
        # + 1: the last codec token is the stop token's place and is dropped
        return dict(input_ids=ids, spk="Bench", max_new_tokens=args.text_tokens, eos_token_id=[], seed=0,
                    talker_do_sample=False, talker_eos_token_id=[], talker_max_new_tokens=n_codes + 1)

    warm_up(model, settings(codes), args.mode, codes)
    start, first, chunks = time.perf_counter(), None, []
    if args.mode == "whole":
        _, wav = model.generate(**settings(codes))
        first = time.perf_counter() - start
    else:
        for event in model.generate_stream(**settings(codes)):
            if isinstance(event, AudioChunk):
                first = first or time.perf_counter() - start
                chunks.append(event.audio)
        wav = np.concatenate(chunks)
    total = time.perf_counter() - start
    np.save(args.save, wav)
    emit(dict(bench="streaming", mode=args.mode, first_audio_s=round(first, 2), total_s=round(total, 2),
              chunks=len(chunks) if args.mode == "stream" else 1, speech_seconds=round(len(wav) / 24000, 2),
              config="tiny" if args.tiny else "thinker 0.5B shape, talker and token2wav of the 7B",
              text_tokens=args.text_tokens, dtype="float32", device="CPU"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the spoken answer")
    ap.add_argument("--text_tokens", type=int, default=64, help="length of the text answer")
    ap.add_argument("--mode", choices=["whole", "stream"], help=argparse.SUPPRESS)  # one child process
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return run_mode(args)

    import tempfile

    records, waves = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("whole", "stream"):
            save = os.path.join(tmp, f"{mode}.npy")
            child = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--save", save,
                     "--seconds", str(args.seconds), "--text_tokens", str(args.text_tokens)] + ["--tiny"] * args.tiny
            # each mode has the machine to itself: MindSpore's pool threads pinned (nn/device.py)
            env = dict(os.environ, MINDONE_EXT_PIN_THREADS=os.environ.get("MINDONE_EXT_PIN_THREADS", "on"))
            out = subprocess.run(child, capture_output=True, text=True, check=False, env=env)
            if out.returncode:
                sys.exit(f"{mode} run failed ({out.returncode}):\n{out.stderr[-3000:]}")
            records[mode] = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
            emit(records[mode])
            waves[mode] = np.load(save).astype(np.float64)
    whole, stream = waves["whole"], waves["stream"]
    same_length = len(whole) == len(stream)
    snr = 10 * np.log10(np.sum(whole ** 2) / max(np.sum((stream - whole) ** 2), 1e-30)) if same_length else None
    emit(dict(bench="streaming",
              first_audio_fraction_of_whole=round(records["stream"]["first_audio_s"] / records["whole"]["total_s"], 3),
              total_ratio_stream_over_whole=round(records["stream"]["total_s"] / records["whole"]["total_s"], 3),
              same_length=same_length, snr_db_stream_vs_whole=None if snr is None else round(float(snr), 1)))


if __name__ == "__main__":
    main()
