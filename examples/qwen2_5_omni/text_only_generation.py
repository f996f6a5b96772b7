"""Chat with Qwen2.5-Omni in text.

    python examples/qwen2_5_omni/text_only_generation.py                       # bundled tiny checkpoint
    python examples/qwen2_5_omni/text_only_generation.py --model_path Qwen/Qwen2.5-Omni-7B-local-folder \
        --prompt "Who are you?" --mindspore_dtype bfloat16 --attn_implementation flash_attention_2

The bundled checkpoint has random weights: it shows the pipeline runs end to end, its words mean
nothing. Runs without torch.
"""
import argparse
import time

from common import DTYPES, TINY_CHECKPOINT, mindspore_dtype, printable, run_script


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=TINY_CHECKPOINT, help="a Hugging Face Qwen2.5-Omni folder")
    ap.add_argument("--prompt", default="Give me a short introduction to large language models.")
    ap.add_argument("--system", default="You are a helpful assistant.")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--mindspore_dtype", choices=DTYPES, default="float32")
    ap.add_argument("--attn_implementation", choices=["eager", "sdpa", "flash_attention_2"], default="eager")
    ap.add_argument("--do_sample", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top_k", type=int, default=20)
    ap.add_argument("--top_p", type=float, default=0.8)
    ap.add_argument("--repetition_penalty", type=float, default=1.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device_target", choices=["CPU", "Ascend"], default=None,
                    help="MindSpore device (default: MindSpore's own choice)")
    return ap.parse_args()


def main():
    args = parse_args()  # --help answers before MindSpore and transformers load
    import mindspore as ms
    from transformers import AutoTokenizer

    from mindone_ext import Qwen2_5OmniForConditionalGeneration

    if args.device_target:
        ms.set_context(device_target=args.device_target)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
        args.model_path, mindspore_dtype=mindspore_dtype(args.mindspore_dtype),
        attn_implementation=args.attn_implementation, enable_audio_output=False)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    conversation = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer([text], return_tensors="np")
    start = time.time()
    text_ids = model.generate(**inputs, return_audio=False, max_new_tokens=args.max_new_tokens,
                              do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    elapsed = time.time() - start
    new = text_ids[:, inputs["input_ids"].shape[1]:]
    answer = tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    print(f"user: {args.prompt}")
    print(f"assistant: {printable(answer)}")
    print(f"[{new.shape[1]} tokens in {elapsed:.2f} s; a machine's first run also compiles the graphs]")


if __name__ == "__main__":
    run_script(main)
