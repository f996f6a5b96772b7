"""Export a checkpoint mindone_ext loads, optionally with a LoRA adapter merged in, as a Hugging Face
folder the PyTorch reference (transformers' Qwen2_5OmniForConditionalGeneration, vLLM, ...) loads.

    python tools/convert/convert_ms2pt.py --src /models/Qwen2.5-Omni-7B-ms --adapter_path ./omni_lora \
        --out /models/Qwen2.5-Omni-7B-finetuned [--dtype bfloat16] [--max_shard_size 5GB] [--overwrite]

The same as `model.save_pretrained(out)` after `model.load_adapter(...)` and `merge_lora(...)`:
the reference's tensor names, sharded safetensors with their index, config.json, and the
tokenizer, processor and speaker files of the source folder. Nothing appears at --out unless the
whole folder was written.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from mindone_ext import Qwen2_5OmniForConditionalGeneration  # noqa: E402
from mindone_ext.nn.lora import LoraError, merge_lora  # noqa: E402
from mindone_ext.utils.checkpoint import CheckpointError  # noqa: E402
from mindone_ext.utils.safetensors_io import SafetensorsError  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="a folder from_pretrained loads")
    ap.add_argument("--adapter_path", default=None, help="a LoRA adapter folder to merge into the weights")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--max_shard_size", default="5GB")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    try:
        if os.path.exists(args.out) and not args.overwrite:  # before spending time on loading
            raise CheckpointError(f"output {os.path.abspath(args.out)!r} already exists (pass --overwrite to replace it)")
        model = Qwen2_5OmniForConditionalGeneration.from_pretrained(args.src)
        if args.adapter_path:
            merge_lora(model.load_adapter(args.adapter_path))
        path = model.save_pretrained(args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                     overwrite=args.overwrite)
    except (CheckpointError, LoraError, SafetensorsError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
