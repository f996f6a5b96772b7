"""Chat about music: genre, instruments, mood, tempo.

    python examples/qwen2_5_omni/omni_chatting_for_music.py [--audio song.mp3] [--model_path DIR]
"""
from common import answer, demo_media, load, parser, run_script, system_turn, user_turn

QUESTION = "What is the genre of this music, which instruments do you hear, and what mood does it convey?"


def main():
    ap = parser(__doc__)
    ap.add_argument("--audio", help="a music file; default: a generated clip")
    args = ap.parse_args()
    model, processor = load(args)
    audio = args.audio or demo_media()["audio"]
    print(f"user: {QUESTION}")
    answer(model, processor, [system_turn(), user_turn({"type": "audio", "audio": audio}, text=QUESTION)],
           args.max_new_tokens)


if __name__ == "__main__":
    run_script(main)
