"""Fine-tune the Thinker of Qwen2.5-Omni with LoRA through MindSpore's own trainer API
(`mindspore.train.Model` with a dataset, an optimizer and callbacks).

    python examples/qwen2_5_omni/finetune_lora_with_mindspore_trainer.py      # tiny checkpoint, demo OCR set
    python examples/qwen2_5_omni/finetune_lora_with_mindspore_trainer.py --model_path /models/Qwen2.5-Omni-7B \
        --lora_rank 8 --lora_alpha 16 --dataset_path /data/latex_ocr --output_dir ./omni_lora \
        --num_train_epochs 1 --learning_rate 1e-4 --save_total_limit 2

The same task as finetune_lora_in_native_mindspore.py (same data reading, labels and LoRA), with
MindSpore's pieces instead of a hand-written loop: a `GeneratorDataset` of padded batches, the
network returning the loss, `nn.AdamWeightDecay` with a per-step warmup + cosine learning rate,
`Model.train` with `LossMonitor`/`TimeMonitor` and a callback that writes the adapter in PEFT's
layout every `--save_steps` (atomically, keeping `--save_total_limit`; the optimizer's state stays
inside MindSpore's optimizer, so these checkpoints hold the adapter only). Use the native script when
you need resuming, gradient accumulation or evaluation.

mindone's `Trainer` was considered: it is built for mindone.transformers models and pulls in
mindcv and OpenCV; `mindspore.train.Model` is part of MindSpore and runs here as is.
"""
import argparse
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import TINY_CHECKPOINT, add_model_flags, end_quietly_on_interrupt, mindspore_dtype, on_interrupt  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=TINY_CHECKPOINT)
    ap.add_argument("--dataset_path", default=None, help="default: a generated 16-image LaTeX OCR set")
    ap.add_argument("--prompt", default="Write the LaTeX formula shown in the image.")
    ap.add_argument("--allow_remote_media", action="store_true",
                    help="fetch media the dataset names by http(s) URL (off: such rows are skipped and counted)")
    ap.add_argument("--output_dir", default="omni_lora_trainer_output")
    ap.add_argument("--lora_rank", type=int, default=8)
    ap.add_argument("--lora_alpha", type=float, default=16)
    ap.add_argument("--lora_dropout", type=float, default=0.05)
    ap.add_argument("--use_rslora", action="store_true",
                    help="scale the adapters by lora_alpha / sqrt(rank) (rsLoRA) instead of lora_alpha / rank")
    ap.add_argument("--num_train_epochs", type=int, default=1)
    ap.add_argument("--per_device_batch_size", "--per_device_train_batch_size", dest="per_device_batch_size", type=int,
                    default=1)
    ap.add_argument("--learning_rate", type=float, default=1e-4)
    ap.add_argument("--warmup_steps", type=int, default=0)
    ap.add_argument("--weight_decay", type=float, default=0.0)
    ap.add_argument("--save_steps", type=int, default=100)
    ap.add_argument("--save_total_limit", type=int, default=2)
    add_model_flags(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device_target", choices=["CPU", "Ascend"], default=None)
    return ap.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # --help and bad flags are answered before MindSpore loads
    end_quietly_on_interrupt()

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import Tensor, nn  # noqa: E402
from mindspore.train import Callback, LossMonitor, Model, TimeMonitor  # noqa: E402
from demo_media import write_ocr_dataset  # noqa: E402

from mindone_ext import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor  # noqa: E402
from mindone_ext.nn.lora import LoraConfig, LoraError, apply_lora, save_adapter  # noqa: E402
from mindone_ext.training import (Collator, ConversationDataset, DatasetError, causal_lm_loss_sum,  # noqa: E402
                                  cosine_with_warmup, latest_checkpoint, save_checkpoint)

# Every batch carries every column (MindSpore datasets have fixed columns); a modality the batch
# lacks is an empty array, which the network reads as "absent".
COLUMNS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "input_features",
           "feature_attention_mask")
EMPTY = {"pixel_values": np.zeros((0, 1), np.float32), "image_grid_thw": np.zeros((0, 3), np.int64),
         "input_features": np.zeros((0, 1, 1), np.float32), "feature_attention_mask": np.zeros((0, 1), np.int64)}


class ThinkerLoss(nn.Cell):
    """Dataset columns in, mean loss over the batch's assistant tokens out."""

    def __init__(self, thinker):
        super().__init__()
        self.thinker = thinker

    def construct(self, *columns):
        batch = {name: value.asnumpy() for name, value in zip(COLUMNS, columns) if value.shape[0] > 0}
        loss, tokens = causal_lm_loss_sum(self.thinker, batch)
        return loss / tokens


class SaveAdapter(Callback):
    """Every `every` steps and at the end: output_dir/checkpoint-N with the adapter (written whole or
    not at all, the newest `limit` kept), and the final adapter in output_dir."""

    def __init__(self, thinker, output_dir, every, limit):
        super().__init__()
        self.thinker, self.output_dir, self.every, self.limit = thinker, output_dir, every, limit

    def save(self, step):
        save_checkpoint(self.output_dir, self.thinker, None, {"global_step": step}, self.limit)

    def on_train_step_end(self, run_context):
        step = run_context.original_args().cur_step_num
        if step % self.every == 0:
            self.save(step)

    def on_train_end(self, run_context):
        step = run_context.original_args().cur_step_num
        if step % self.every:
            self.save(step)
        save_adapter(self.thinker, self.output_dir)


class LossHistory(Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_step_end(self, run_context):
        self.losses.append(float(np.asarray(run_context.original_args().net_outputs.asnumpy())))


def batches(dataset, collate, batch_size, epochs, seed):
    for epoch in range(epochs):
        order = np.random.default_rng(seed + epoch).permutation(len(dataset))
        for begin in range(0, len(order), batch_size):
            batch = collate([dataset[i] for i in order[begin:begin + batch_size]])
            if batch is not None:
                yield tuple(batch.get(name, EMPTY.get(name)) for name in COLUMNS)


def main(args):
    if args.device_target:
        ms.set_context(device_target=args.device_target)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the Thinker prepares multimodal inputs on the host
    if args.dataset_path is None:
        args.dataset_path = write_ocr_dataset(os.path.join(tempfile.gettempdir(), "mindone_ext_demo_ocr"))
    data = ConversationDataset(args.dataset_path, args.prompt, allow_remote=args.allow_remote_media)
    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(
        args.model_path, mindspore_dtype=mindspore_dtype(args.mindspore_dtype),
        attn_implementation=args.attn_implementation, enable_audio_output=False).thinker
    collate = Collator(Qwen2_5OmniProcessor.from_pretrained(args.model_path))
    apply_lora(thinker, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                   use_rslora=args.use_rslora, base_model_name_or_path=os.path.abspath(args.model_path)),
               seed=args.seed)
    steps = args.num_train_epochs * math.ceil(len(data) / args.per_device_batch_size)
    schedule = Tensor([args.learning_rate * cosine_with_warmup(s, args.warmup_steps, steps) for s in range(steps)],
                      ms.float32)
    optimizer = nn.AdamWeightDecay(thinker.trainable_params(), learning_rate=schedule, weight_decay=args.weight_decay)
    dataset = ms.dataset.GeneratorDataset(
        lambda: batches(data, collate, args.per_device_batch_size, args.num_train_epochs, args.seed),
        column_names=list(COLUMNS), shuffle=False)
    os.makedirs(args.output_dir, exist_ok=True)
    history = LossHistory()
    model = Model(ThinkerLoss(thinker), optimizer=optimizer)
    model.train(1, dataset, callbacks=[LossMonitor(1), TimeMonitor(), history,
                                       SaveAdapter(thinker, args.output_dir, args.save_steps, args.save_total_limit)],
                dataset_sink_mode=False)
    summary = {"steps": len(history.losses), "first_loss": history.losses[0], "final_loss": history.losses[-1],
               "skipped_rows": dict(data.skipped + collate.skipped), "output_dir": args.output_dir}
    print(json.dumps(summary))
    return summary


def checkpoint_note(output_dir):
    newest = latest_checkpoint(output_dir)
    return f"the newest adapter is in {newest}" if newest else "no checkpoint written"


if __name__ == "__main__":
    try:
        with on_interrupt(lambda: checkpoint_note(ARGS.output_dir)):
            main(ARGS)
    except (DatasetError, LoraError) as e:
        raise SystemExit(f"error: {e}") from None
