"""Solve a maths problem shown and spoken in a video: frames and the video's own sound track
together (use_audio_in_video).

    python examples/qwen2_5_omni/omni_chatting_for_math.py [--video problem.mp4] [--model_path DIR]
"""
from common import answer, demo_media, load, parser, run_script, system_turn


def main():
    ap = parser(__doc__)
    ap.add_argument("--video", help="a video with an audio track; default: a generated clip")
    args = ap.parse_args()
    model, processor = load(args)
    video = args.video or demo_media()["video"]
    conversation = [system_turn(), {"role": "user", "content": [{"type": "video", "video": video}]}]
    print("user: <video with its audio>")
    answer(model, processor, conversation, args.max_new_tokens, use_audio_in_video=True)


if __name__ == "__main__":
    run_script(main)
