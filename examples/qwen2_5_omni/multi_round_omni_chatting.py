"""A conversation over several rounds mixing audio, image and video; each answer is kept in the
history for the next round.

    python examples/qwen2_5_omni/multi_round_omni_chatting.py [--audio a.wav --image p.png --video v.mp4]
"""
from common import answer, demo_media, load, parser, run_script, system_turn, user_turn


def main():
    ap = parser(__doc__)
    ap.add_argument("--audio")
    ap.add_argument("--image")
    ap.add_argument("--video")
    args = ap.parse_args()
    model, processor = load(args)
    demo = demo_media() if not (args.audio and args.image and args.video) else {}
    audio, image, video = args.audio or demo["audio"], args.image or demo["image"], args.video or demo["video"]
    rounds = [
        user_turn({"type": "audio", "audio": audio}, text="What did you hear?"),
        user_turn({"type": "image", "image": image}, text="Describe this picture."),
        user_turn({"type": "video", "video": video}, text="Does the video relate to the picture and the audio?"),
    ]
    conversation = [system_turn()]
    for turn in rounds:
        conversation.append(turn)
        print(f"\nuser: {turn['content'][-1]['text']}")
        reply = answer(model, processor, conversation, args.max_new_tokens)
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})


if __name__ == "__main__":
    run_script(main)
