"""Fine-tune the Thinker of Qwen2.5-Omni with LoRA in a plain MindSpore loop.

    python examples/qwen2_5_omni/finetune_lora_in_native_mindspore.py       # tiny checkpoint, demo OCR set
    python examples/qwen2_5_omni/finetune_lora_in_native_mindspore.py --model_path /models/Qwen2.5-Omni-7B \
        --dataset_path /data/latex_ocr --prompt "Write the LaTeX of the formula." --mindspore_dtype bfloat16 \
        --lora_rank 8 --lora_alpha 16 --per_device_batch_size 1 --gradient_accumulation_steps 8 \
        --learning_rate 1e-4 --num_train_epochs 1 --output_dir ./omni_lora
    python examples/qwen2_5_omni/finetune_lora_in_native_mindspore.py --dataset_path asr.jsonl \
        --prompt "Transcribe the audio."                                      # speech: audio + transcript

The dataset is a JSONL file, Parquet files or a `datasets.save_to_disk` folder of conversations or
flat rows (image/audio/video + text); see mindone_ext/training/data.py. The loss counts the
assistant's tokens only. Each optimizer step: forward and backward of every micro-batch over the
adapters only (each decoder layer's forward and backward as compiled graphs per bucketed batch
shape, the encoders op by op, when --lora_dropout is 0, PEFT's default; all op by op otherwise,
see --step), gradients summed over the accumulation window and divided by its labelled-token count,
clipped by global norm, AdamW with warmup and cosine decay. Checkpoints
(`output_dir/checkpoint-N`) are written atomically; `--resume` continues from the newest one with
the same data order and dropout masks. The adapter ends up in `output_dir` in PEFT's layout (load it
with infer_with_lora.py, or with PEFT in PyTorch).

Multi-card data parallel (8 Ascend cards): `msrun --worker_num 8 --local_worker_num 8
examples/qwen2_5_omni/finetune_lora_in_native_mindspore.py --distributed ...`; each card takes
every 8th micro-batch and the gradients are summed across cards before the step.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import TINY_CHECKPOINT, add_model_flags, end_quietly_on_interrupt, mindspore_dtype, on_interrupt  # noqa: E402

TARGET_PRESETS = ("llm", "llm+audio", "llm+vision", "all")  # the thinker's decoder, with an encoder or both


# A real run's defaults, and the demo's (the bundled tiny checkpoint on the generated 16-image set,
# no --dataset_path): its random weights learn visibly only with a large step; with these its loss
# falls from ~6.7 to ~2.4 in 20 steps (~40 s on a 2-core CPU), where a real run's left it flat.
RUN_DEFAULTS = dict(learning_rate=1e-4, per_device_batch_size=1, num_train_epochs=1)
DEMO_DEFAULTS = dict(learning_rate=2e-2, per_device_batch_size=4, num_train_epochs=5)


def fill_defaults(args):
    """The flags left unset take the demo's defaults on the demo, a real run's otherwise."""
    demo = args.dataset_path is None and os.path.realpath(args.model_path) == os.path.realpath(TINY_CHECKPOINT)
    for name, value in (DEMO_DEFAULTS if demo else RUN_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=TINY_CHECKPOINT, help="a Hugging Face Qwen2.5-Omni folder")
    ap.add_argument("--dataset_path", default=None, help="JSONL / Parquet / save_to_disk folder "
                    "(default: a generated 16-image LaTeX OCR set)")
    ap.add_argument("--eval_dataset_path", default=None, help="evaluate on this set every --eval_steps")
    ap.add_argument("--prompt", default="Write the LaTeX formula shown in the image.",
                    help="the user's text for flat rows that carry none")
    ap.add_argument("--answer_column", default=None, help="the answer's column in flat rows "
                    "(default: the first of answer, text, transcript, response)")
    ap.add_argument("--system_prompt", default=None)
    ap.add_argument("--use_audio_in_video", action="store_true")
    ap.add_argument("--output_dir", default="omni_lora_output")
    ap.add_argument("--lora_rank", type=int, default=8)
    ap.add_argument("--lora_alpha", type=float, default=16)
    ap.add_argument("--lora_dropout", type=float, default=0.0,
                    help="PEFT's default, 0, lets the step run compiled; with dropout it runs op by op")
    ap.add_argument("--use_rslora", action="store_true",
                    help="scale the adapters by lora_alpha / sqrt(rank) (rsLoRA) instead of lora_alpha / rank")
    ap.add_argument("--target_modules", default="llm", help=f"one of {list(TARGET_PRESETS)}, a regular "
                    "expression for full module names, or a comma-separated list of name suffixes")
    ap.add_argument("--num_train_epochs", type=float, default=None, help="default: 1 (the demo: 5)")
    ap.add_argument("--max_steps", type=int, default=None, help="optimizer steps (overrides epochs)")
    ap.add_argument("--per_device_batch_size", "--per_device_train_batch_size", dest="per_device_batch_size", type=int,
                    default=None, help="default: 1 (the demo: 4)")
    ap.add_argument("--gradient_accumulation_steps", type=int, default=1)
    ap.add_argument("--learning_rate", type=float, default=None, help="default: 1e-4 (the demo: 2e-2)")
    ap.add_argument("--weight_decay", type=float, default=0.0)
    ap.add_argument("--warmup_steps", type=int, default=0)
    ap.add_argument("--max_grad_norm", type=float, default=1.0)
    ap.add_argument("--max_length", type=int, default=None, help="drop (and count) longer samples")
    ap.add_argument("--allow_remote_media", action="store_true",
                    help="fetch media the dataset names by http(s) URL (off: such rows are skipped and counted)")
    add_model_flags(ap, dtype_help="the base weights' dtype; adapters and optimizer stay float32 "
                    "(float16 adds loss scaling)")
    ap.add_argument("--recompute", action="store_true",
                    help="keep only each decoder layer's input for the backward pass and compute the rest again "
                    "(less memory, about a third more compute)")
    ap.add_argument("--step", choices=["auto", "compiled", "eager"], default="auto",
                    help="compiled: each decoder layer's forward and backward as compiled graphs, the encoders op by "
                    "op (needs --lora_dropout 0); eager: all op by op; auto: compiled when it can be")
    ap.add_argument("--save_steps", type=int, default=100)
    ap.add_argument("--save_total_limit", type=int, default=2)
    ap.add_argument("--eval_steps", type=int, default=100)
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device_target", choices=["CPU", "Ascend"], default=None)
    ap.add_argument("--distributed", action="store_true", help="data parallel under msrun")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


if __name__ == "__main__":
    ARGS = parser().parse_args()  # --help and bad flags are answered before MindSpore loads
    end_quietly_on_interrupt()

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from demo_media import write_ocr_dataset  # noqa: E402

from mindone_ext import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor  # noqa: E402
from mindone_ext.nn.lora import (AUDIO_ATTENTION_TARGETS, THINKER_LLM_TARGETS, VISION_ATTENTION_TARGETS,  # noqa: E402
                                 LoraConfig, LoraError, apply_lora, save_adapter)
from mindone_ext.training import (AdamW, Collator, ConversationDataset, DatasetError, DynamicLossScale,  # noqa: E402
                                  causal_lm_loss_sum, clip_by_global_norm, cosine_with_warmup, latest_checkpoint,
                                  resume_latest, save_checkpoint)
from mindone_ext.training.compiled import CompiledLossGrad, outside_language_model  # noqa: E402
from mindone_ext.training.distributed import DataParallel  # noqa: E402
from mindone_ext.utils.atomic_file import written_atomically  # noqa: E402


def target_modules(spec):
    presets = dict(zip(TARGET_PRESETS, (THINKER_LLM_TARGETS, f"({THINKER_LLM_TARGETS})|({AUDIO_ATTENTION_TARGETS})",
                                        f"({THINKER_LLM_TARGETS})|({VISION_ATTENTION_TARGETS})",
                                        f"({THINKER_LLM_TARGETS})|({AUDIO_ATTENTION_TARGETS})|({VISION_ATTENTION_TARGETS})")))
    if spec in presets:
        return presets[spec]
    return spec.split(",") if "," in spec else spec


def micro_batches(n, batch_size, seed, start):
    """Indices of every micro-batch from number `start` on: epoch e visits the rows in a fixed
    permutation drawn from seed + e, so a resumed run sees exactly the batches it would have."""
    per_epoch = math.ceil(n / batch_size)
    index = start
    while True:
        epoch, k = divmod(index, per_epoch)
        order = np.random.default_rng(seed + epoch).permutation(n)
        yield order[k * batch_size:(k + 1) * batch_size].tolist()
        index += 1


def evaluate(thinker, dataset, collate, batch_size):
    thinker.set_train(False)
    total, count = 0.0, 0
    for begin in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(begin, min(begin + batch_size, len(dataset)))])
        if batch is not None:
            loss, n = causal_lm_loss_sum(thinker, batch)
            total, count = total + float(loss.asnumpy()), count + n
    thinker.set_train(True)
    return total / max(count, 1)


def train(args):
    fill_defaults(args)
    if args.device_target:
        ms.set_context(device_target=args.device_target)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    parallel = DataParallel.start() if args.distributed else DataParallel.single()
    if args.dataset_path is None:
        args.dataset_path = write_ocr_dataset(os.path.join(tempfile.gettempdir(), "mindone_ext_demo_ocr"))
    dataset = ConversationDataset(args.dataset_path, args.prompt, args.answer_column, args.system_prompt,
                                  args.allow_remote_media)
    eval_set = ConversationDataset(args.eval_dataset_path, args.prompt, args.answer_column, args.system_prompt,
                                   args.allow_remote_media) if args.eval_dataset_path else None
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
        args.model_path, mindspore_dtype=mindspore_dtype(args.mindspore_dtype),
        attn_implementation=args.attn_implementation, enable_audio_output=False)
    thinker = model.thinker
    processor = Qwen2_5OmniProcessor.from_pretrained(args.model_path)
    collate = Collator(processor, args.use_audio_in_video, args.max_length)
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        use_rslora=args.use_rslora, target_modules=target_modules(args.target_modules),
                        base_model_name_or_path=os.path.abspath(args.model_path))
    apply_lora(thinker, config, seed=args.seed)
    if args.recompute:
        for layer in thinker.model.layers:
            layer.recompute()
    thinker.set_train(True)
    params = thinker.trainable_params()
    optimizer = AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    compiled = None
    if args.step != "eager" and not outside_language_model(thinker):
        if args.lora_dropout == 0:
            compiled = CompiledLossGrad(thinker, params, recompute=args.recompute)
        else:  # MindSpore 2.7.1 cannot re-seed a compiled graph's dropout per step: --resume would draw other masks
            parallel.log("--lora_dropout > 0: the training step runs op by op, not compiled")
    loss_scale = DynamicLossScale() if args.mindspore_dtype == "float16" else None

    global_batch = args.per_device_batch_size * args.gradient_accumulation_steps * parallel.size
    steps = args.max_steps or math.ceil(args.num_train_epochs * len(dataset) / global_batch)
    state = {"global_step": 0, "log_history": [], "loss_scale": loss_scale.scale if loss_scale else None}
    if args.resume:
        found, state = resume_latest(args.output_dir, thinker, optimizer)
        if found is None:
            raise SystemExit(f"--resume: no complete checkpoint that restores in {args.output_dir!r}")
        if loss_scale:
            loss_scale.scale = state["loss_scale"]
        parallel.log(f"resumed from {found} at step {state['global_step']}")
    os.makedirs(args.output_dir, exist_ok=True)

    # Every card walks the same sequence of micro-batches and keeps every size-th one.
    micro_per_step = args.gradient_accumulation_steps * parallel.size
    batches = micro_batches(len(dataset), args.per_device_batch_size, args.seed,
                            state["global_step"] * micro_per_step)
    progress = parallel.progress(total=steps, initial=state["global_step"], disable=args.quiet)
    while state["global_step"] < steps:
        step = state["global_step"]
        ms.set_seed(args.seed + step * parallel.size + parallel.rank)  # dropout masks reproducible on resume
        window = [collate([dataset[i] for i in next(batches)]) for _ in range(micro_per_step)]
        mine = [b for b in window[parallel.rank::parallel.size] if b is not None]
        # The window's loss is the mean over all its labelled tokens, on every card together.
        tokens = parallel.sum_scalar(sum(int((b["labels"][:, 1:] != -100).sum()) for b in mine))
        if tokens == 0:  # every sample of the window was unusable (counted in skipped_rows)
            state["global_step"] = step + 1
            continue
        scale = loss_scale.scale if loss_scale else 1.0
        started, loss_sum, grads = time.time(), 0.0, None
        for batch in mine:
            if compiled is not None:
                loss, micro_grads = compiled(batch, scale / tokens)
            else:
                def micro_loss(batch=batch):
                    loss, _ = causal_lm_loss_sum(thinker, batch)
                    return loss * (scale / tokens)

                loss, micro_grads = ms.value_and_grad(micro_loss, None, params)()
            loss_sum += float(loss.asnumpy()) / scale * tokens
            grads = micro_grads if grads is None else tuple(g + m for g, m in zip(grads, micro_grads))
        if grads is None:  # no usable sample on this card: contribute zeros
            grads = tuple(ms.ops.zeros(p.shape, ms.float32) for p in params)
        grads = parallel.sum_grads(grads)
        loss_value = parallel.sum_scalar(loss_sum) / tokens
        finite = True
        if loss_scale:
            grads, finite = loss_scale.unscale(grads)
            loss_scale.update(finite)
        lr = args.learning_rate * cosine_with_warmup(step, args.warmup_steps, steps)
        grad_norm = float("nan")
        if finite:
            grads, grad_norm = clip_by_global_norm(grads, args.max_grad_norm)
            optimizer.step(grads, lr)
        state["global_step"] = step + 1
        entry = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                 "tokens_per_s": tokens / (time.time() - started), "skipped_step": not finite}
        if eval_set is not None and (step + 1) % args.eval_steps == 0:
            entry["eval_loss"] = evaluate(thinker, eval_set, collate, args.per_device_batch_size)
        state["log_history"].append(entry)
        progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
        progress.update(1)
        if loss_scale:
            state["loss_scale"] = loss_scale.scale
        if parallel.is_main and ((step + 1) % args.save_steps == 0 or step + 1 == steps):
            save_checkpoint(args.output_dir, thinker, optimizer, state, args.save_total_limit)
    progress.close()
    summary = {"steps": state["global_step"], "final_loss": state["log_history"][-1]["loss"],
               "first_loss": state["log_history"][0]["loss"], "skipped_rows": dict(dataset.skipped + collate.skipped),
               "output_dir": args.output_dir, "world_size": parallel.size}
    if eval_set is not None:
        summary["eval_loss"] = evaluate(thinker, eval_set, collate, args.per_device_batch_size)
    if parallel.is_main:
        save_adapter(thinker, args.output_dir)
        with written_atomically(os.path.join(args.output_dir, "trainer_state.json")) as temporary, \
                open(temporary, "w") as f:
            json.dump(state, f, indent=1)
        print(json.dumps(summary))
    return summary


def resume_note(output_dir):
    newest = latest_checkpoint(output_dir)
    return f"{newest} is the newest checkpoint: --resume continues from it" if newest else "no checkpoint written"


if __name__ == "__main__":
    try:
        with on_interrupt(lambda: resume_note(ARGS.output_dir)):
            train(ARGS)
    except (DatasetError, LoraError) as e:
        raise SystemExit(f"error: {e}") from None
