"""Talk to Qwen2.5-Omni: a spoken question in, a text answer and a spoken answer (24 kHz wav) out.

    python examples/qwen2_5_omni/voice_chatting.py                          # bundled tiny checkpoint
    python examples/qwen2_5_omni/voice_chatting.py --model_path /models/Qwen2.5-Omni-7B \
        --audio question.wav --speaker Ethan --output answer.wav --mindspore_dtype bfloat16
    python examples/qwen2_5_omni/voice_chatting.py --stream    # text and speech as they are produced

With --stream, the question is fed in 0.5 s pieces as a microphone would deliver them (the
conversation is prefilled while it "arrives"), text is printed token by token and each speech
chunk is written as it arrives (OUTPUT_chunks/chunk_000.wav, ...), then joined into the output
file; the times from the end of the question to the first text token and the first speech chunk
are reported.

With no --audio, a short generated speech-like clip is the question. The bundled checkpoint has
random weights: its text and voice mean nothing, but every stage runs. Needs no torch.
"""
import os
import time

import numpy as np

from common import SYSTEM_PROMPT, TINY_CHECKPOINT, demo_media, load_with_speech, parser, printable, run_script, user_turn

from mindone_ext import process_mm_info
from mindone_ext.utils.audio import write_wav

SAMPLE_RATE = 24000


def main():
    ap = parser(__doc__)
    ap.add_argument("--audio", help="the spoken question (any format FFmpeg reads); default: a generated clip")
    ap.add_argument("--speaker", default="Chelsie", help="voice of the answer (a name in the speaker file)")
    ap.add_argument("--output", default="output.wav")
    ap.add_argument("--talker_max_new_tokens", type=int, default=None,
                    help="codec tokens at most (50 per second of speech); default 4096, or 100 on the bundled "
                         "random checkpoint, whose Talker has no reason to stop")
    ap.add_argument("--seed", type=int, default=0, help="seed for the Talker's sampling and the ODE noise")
    ap.add_argument("--stream", action="store_true", help="print text and write speech chunks as they come")
    ap.set_defaults(max_new_tokens=128)
    args = ap.parse_args()
    if args.talker_max_new_tokens is None:
        from mindone_ext.bundled import talker_max_new_tokens

        args.talker_max_new_tokens = talker_max_new_tokens(args.model_path, bundled=TINY_CHECKPOINT)
    model, processor = load_with_speech(args)
    audio = args.audio or demo_media()["audio"]
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                    user_turn({"type": "audio", "audio": audio}, text="")]
    conversation[1]["content"] = conversation[1]["content"][:1]  # the question is the audio itself
    audios, _, _ = process_mm_info(conversation)
    settings = dict(spk=args.speaker, max_new_tokens=args.max_new_tokens,
                    talker_max_new_tokens=args.talker_max_new_tokens, seed=args.seed)
    if args.stream:
        start, waveform = stream(model, processor, audios[0], settings, args.output)
    else:
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs = processor(text, audio=audios)
        start = time.time()
        text_ids, waveform = model.generate(**inputs, return_audio=True, **settings)
        answer = processor.batch_decode(text_ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        print(f"assistant: {printable(answer)}")
    elapsed = time.time() - start
    write_wav(args.output, waveform, SAMPLE_RATE)
    samples_per_code = model.samples_per_codec_token
    print(f"speech: {len(waveform) // samples_per_code} codec tokens, {len(waveform) / SAMPLE_RATE:.2f} s "
          f"at {SAMPLE_RATE} Hz -> {args.output}")
    print(f"[{elapsed:.1f} s; a machine's first run also compiles the graphs]")


def stream(model, processor, question, settings, output, piece_seconds=0.5):
    """Feeds the question piece by piece, then prints text deltas and writes each speech chunk as
    it arrives. Returns (the moment the question ended, the joined waveform)."""
    from mindone_ext.models.qwen2_5_omni import AudioChunk, ConversationSession

    session = ConversationSession(model, processor, SYSTEM_PROMPT)
    session.begin_audio()
    piece = int(piece_seconds * 16000)
    for i in range(0, len(question), piece):
        session.feed_audio(question[i:i + piece])
    start = time.time()  # the user stops speaking: only the last encoder window is left
    session.end_audio()
    folder = os.path.splitext(output)[0] + "_chunks"
    os.makedirs(folder, exist_ok=True)
    chunks, first_text, first_audio = [], None, None
    print("assistant: ", end="", flush=True)
    for event in session.respond(tokenizer=processor.tokenizer, **settings):
        if isinstance(event, AudioChunk):
            first_audio = first_audio or time.time() - start
            write_wav(os.path.join(folder, f"chunk_{len(chunks):03d}.wav"), event.audio, SAMPLE_RATE)
            chunks.append(event.audio)
        else:
            first_text = first_text or time.time() - start
            print(printable(event.text), end="", flush=True)
    print()
    print(f"after the end of the question: first text token in {first_text:.2f} s, first speech chunk in "
          f"{'-' if first_audio is None else f'{first_audio:.2f}'} s; {len(chunks)} chunks in {folder}/")
    return start, np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


if __name__ == "__main__":
    run_script(main)
