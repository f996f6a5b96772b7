"""Audio understanding: speech recognition, speech translation and sound analysis.

    python examples/qwen2_5_omni/universal_audio_understanding.py [--audio speech.wav] [--model_path DIR]
"""
from common import answer, demo_media, load, parser, run_script, system_turn, user_turn

PROMPTS = [
    ("asr", "Transcribe the English audio into text without any punctuation marks."),
    ("translation", "Listen to the provided English speech and produce a translation in Chinese text."),
    ("sound", "What is the emotion of the speaker, and what sounds can you hear?"),
]


def main():
    ap = parser(__doc__)
    ap.add_argument("--audio", help="an audio file (any format FFmpeg reads); default: a generated clip")
    args = ap.parse_args()
    model, processor = load(args)
    audio = args.audio or demo_media()["audio"]
    for name, prompt in PROMPTS:
        print(f"\n[{name}] user: {prompt}")
        conversation = [system_turn("You are a speech recognition model." if name == "asr" else
                                    "You are a helpful assistant."),
                        user_turn({"type": "audio", "audio": audio}, text=prompt)]
        answer(model, processor, conversation, args.max_new_tokens)


if __name__ == "__main__":
    run_script(main)
