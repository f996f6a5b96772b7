"""Ask about a screen recording: what the user did, which page was open, what to do next.

    python examples/qwen2_5_omni/screen_recording_interaction.py [--video screen.mp4] [--question "..."]
"""
from common import answer, demo_media, load, parser, run_script, system_turn, user_turn


def main():
    ap = parser(__doc__)
    ap.add_argument("--video", help="a screen recording; default: a generated clip")
    ap.add_argument("--question", default="What is the user doing on the screen, step by step?")
    args = ap.parse_args()
    model, processor = load(args)
    video = args.video or demo_media()["video"]
    print(f"user: {args.question}")
    # Screen text is small: allow more pixels per frame than the default budget.
    item = {"type": "video", "video": video, "fps": 1.0, "max_pixels": 1280 * 28 * 28}
    answer(model, processor, [system_turn(), user_turn(item, text=args.question)], args.max_new_tokens)


if __name__ == "__main__":
    run_script(main)
