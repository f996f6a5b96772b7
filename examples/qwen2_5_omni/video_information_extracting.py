"""Extract information from a video: what happens, what is written, how many things appear.

    python examples/qwen2_5_omni/video_information_extracting.py [--video clip.mp4] [--model_path DIR]
"""
from common import answer, demo_media, load, parser, run_script, system_turn, user_turn

QUESTIONS = ["What is happening in this video?", "What colours and shapes appear, and how do they move?"]


def main():
    ap = parser(__doc__)
    ap.add_argument("--video", help="a video file; default: a generated clip")
    ap.add_argument("--fps", type=float, default=2.0, help="frames sampled per second")
    args = ap.parse_args()
    model, processor = load(args)
    video = args.video or demo_media()["video"]
    for question in QUESTIONS:
        print(f"\nuser: {question}")
        conversation = [system_turn(), user_turn({"type": "video", "video": video, "fps": args.fps}, text=question)]
        answer(model, processor, conversation, args.max_new_tokens)


if __name__ == "__main__":
    run_script(main)
