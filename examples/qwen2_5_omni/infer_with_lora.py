"""Answer with a base checkpoint plus a LoRA adapter (ours or one trained with PEFT in PyTorch).

    python examples/qwen2_5_omni/finetune_lora_in_native_mindspore.py --output_dir omni_lora_output
    python examples/qwen2_5_omni/infer_with_lora.py --adapter_path omni_lora_output --image formula.png
    python examples/qwen2_5_omni/infer_with_lora.py --model_path /models/Qwen2.5-Omni-7B --adapter_path ./omni_lora \
        --audio question.wav --prompt "Transcribe the audio." --merge

With `--merge` the adapter is folded into the base weights first (no extra cost per token).
Without `--image`/`--audio`, the first picture of the demo OCR set is used.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import answer, load, parser, run_script  # noqa: E402
from demo_media import write_ocr_dataset  # noqa: E402


def main():
    ap = parser(__doc__)
    ap.add_argument("--adapter_path", "--lora_path", dest="adapter_path", default="omni_lora_output",
                    help="a folder with adapter_config.json")
    ap.add_argument("--image", "--image_path", dest="image", default=None)
    ap.add_argument("--audio", default=None)
    ap.add_argument("--prompt", default="Write the LaTeX formula shown in the image.")
    ap.add_argument("--merge", action="store_true", help="fold the adapter into the base weights")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.adapter_path, "adapter_config.json")):
        sys.exit(f"error: no adapter in {args.adapter_path!r}: train one first (python "
                 "examples/qwen2_5_omni/finetune_lora_in_native_mindspore.py writes omni_lora_output), or pass "
                 "--adapter_path a folder with adapter_config.json")
    model, processor = load(args)
    target = model.load_adapter(args.adapter_path)
    config = target.lora_config
    print(f"adapter: rank {config.r}, alpha {config.lora_alpha}, from {args.adapter_path}")
    if args.merge:
        from mindone_ext.nn.lora import merge_lora

        merge_lora(target)
    content = []
    if args.audio:
        content.append({"type": "audio", "audio": args.audio})
    if args.image or not args.audio:
        demo = os.path.join(tempfile.gettempdir(), "mindone_ext_demo_ocr")
        image = args.image or os.path.join(os.path.dirname(write_ocr_dataset(demo)), "images", "0.png")
        content.append({"type": "image", "image": image})
    content.append({"type": "text", "text": args.prompt})
    answer(model, processor, [{"role": "user", "content": content}], args.max_new_tokens)


if __name__ == "__main__":
    run_script(main)
