"""LoRA fine-tuning speed and memory: ours against PyTorch + PEFT on the same model and batch.

    python bench/finetune.py            # 0.5B-shaped thinker, one 448x448 image, 1024 tokens, batch 1
    python bench/finetune.py --tiny     # a smoke run

One training step = forward, backward over the adapters, gradient clipping, AdamW. Ours runs
twice: the step as one compiled graph (`mindone_ext_compiled`, mindone_ext.training.compiled, what
the fine-tuning example uses) and op by op (`mindone_ext`, PyNative); the ratios compare the
compiled step with PEFT (`ratio_eager_*`: the op-by-op one). LoRA rank 8
on the Thinker's attention and MLP projections (the default targets), the loss on the last 256
tokens (the "answer"). Each implementation runs in its own process, so its peak resident memory
(max RSS) is its own; both draw every weight from a seed derived from the weight's name, so the
two models are identical without loading one from the other. The vision encoder is the small one
of bench/thinker_decode.py (the image still becomes 256 tokens of the sequence): the figure is
about the language model's fine-tuning.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402
from thinker_decode import build_config  # noqa: E402

RANK, ALPHA = 8, 16
IMPLS = ("mindone_ext_compiled", "mindone_ext", "torch")  # ours as one compiled graph, ours op by op, PEFT
IMAGE_SIDE, PATCH = 448, 14


def weight(name, shape):
    """The same value for a weight of this name in both implementations."""
    if "norm" in name and name.endswith("weight") and len(shape) == 1:
        return np.ones(shape, np.float32)
    return (np.random.default_rng(zlib.crc32(name.encode())).standard_normal(shape) * 0.02).astype(np.float32)


def batch(config, tokens, answer):
    """[text][vision_bos][image tokens][vision_eos][text], labels on the last `answer` tokens."""
    grid = IMAGE_SIDE // PATCH
    image_tokens = grid * grid // 4
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 151000, size=(1, tokens))
    start = 32
    ids[0, start] = config.thinker_config.vision_start_token_id
    ids[0, start + 1:start + 1 + image_tokens] = config.thinker_config.image_token_index
    ids[0, start + 1 + image_tokens] = config.thinker_config.vision_start_token_id + 1  # <|vision_eos|>
    labels = np.full_like(ids, -100)
    labels[0, -answer:] = ids[0, -answer:]
    pixels = rng.standard_normal((grid * grid, 3 * 2 * PATCH * PATCH)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels, "pixel_values": pixels,
            "image_grid_thw": np.array([[1, grid, grid]])}


def run_ours(config, data, steps, compiled=False, recompute=False):
    import time

    import mindspore as ms

    from mindone_ext.models.qwen2_5_omni.thinker import Qwen2_5OmniThinkerForConditionalGeneration
    from mindone_ext.nn.lora import LoraConfig, apply_lora
    from mindone_ext.training import AdamW, causal_lm_loss_sum, clip_by_global_norm
    from mindone_ext.training.compiled import CompiledLossGrad

    thinker = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config, ms.float32)
    for name, param in thinker.parameters_and_names():
        if not name.endswith("inv_freq"):
            param.set_data(ms.Tensor(weight(name, param.shape)))
    apply_lora(thinker, LoraConfig(r=RANK, lora_alpha=ALPHA))
    if recompute and not compiled:  # the compiled step recomputes in its own graphs
        for layer in thinker.model.layers:
            layer.recompute()
    thinker.set_train(True)
    params = thinker.trainable_params()
    optimizer = AdamW(params, lr=1e-4)
    tokens = int((data["labels"][:, 1:] != -100).sum())

    def loss_fn():
        total, _ = causal_lm_loss_sum(thinker, data)
        return total / tokens

    grad_fn = ms.value_and_grad(loss_fn, None, params)
    if compiled:
        step = CompiledLossGrad(thinker, params, recompute)
        grad_fn = lambda: step(data, 1.0 / tokens)  # noqa: E731
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss, grads = grad_fn()
        grads, _ = clip_by_global_norm(grads, 1.0)
        optimizer.step(grads)
        losses.append(float(loss.asnumpy()))
        times.append(time.perf_counter() - start)
    return times, losses


def run_torch(config, data, steps):
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    from mindone_ext.nn.lora import THINKER_LLM_TARGETS

    thinker = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config)
    with torch.no_grad():
        for name, param in thinker.named_parameters():
            param.copy_(torch.from_numpy(weight(name, tuple(param.shape))))
    model = get_peft_model(thinker, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=THINKER_LLM_TARGETS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    inputs = {k: torch.tensor(v) for k, v in data.items()}
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    return times, losses


def child(args):
    config = build_config("tiny" if args.tiny else "qwen2.5-0.5b")
    config.thinker_config.text_config.vocab_size = 151936  # the vision markers' ids are the real ones
    data = batch(config, args.tokens, args.answer_tokens)
    if args.impl == "torch":
        times, losses = run_torch(config, data, args.steps)
    else:
        times, losses = run_ours(config, data, args.steps, compiled=args.impl == "mindone_ext_compiled",
                                 recompute=args.recompute)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"times": times, "losses": losses, "peak_rss_gb": peak_gb}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--answer_tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="the first (warm-up) step is not timed")
    ap.add_argument("--recompute", action="store_true", help="ours recompute each decoder layer in the backward pass")
    ap.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        return child(args)
    import torch

    common = dict(shape="tiny" if args.tiny else "qwen2.5-0.5b", batch=1, tokens=args.tokens, images=1,
                  image_tokens=(IMAGE_SIDE // PATCH) ** 2 // 4, lora_rank=RANK, dtype="float32", device="CPU",
                  torch_threads=torch.get_num_threads())
    results = {}
    for impl in IMPLS:
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--tokens", str(args.tokens),
               "--answer_tokens", str(args.answer_tokens), "--steps", str(args.steps)] + (["--tiny"] if args.tiny else []) \
            + (["--recompute"] if args.recompute else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # e.g. killed for memory (-9): recorded, and the others still run
            emit(dict(bench="finetune", impl=impl, failed=f"exit {done.returncode}: {done.stderr.strip()[-300:]}",
                      **common))
            continue
        out = json.loads(done.stdout.strip().splitlines()[-1])
        timed = out["times"][1:] or out["times"]
        results[impl] = dict(seconds_per_step=round(float(np.median(timed)), 3), peak_rss_gb=round(out["peak_rss_gb"], 2),
                             first_loss=round(out["losses"][0], 5), first_step_seconds=round(out["times"][0], 2))
        emit(dict(bench="finetune", impl=impl, **results[impl], **common))
    ref, summary = results.get("torch"), dict(bench="finetune")
    for impl, prefix in (("mindone_ext_compiled", "ratio_"), ("mindone_ext", "ratio_eager_")):
        if ref and impl in results:
            summary[prefix + "seconds_per_step"] = round(results[impl]["seconds_per_step"] / ref["seconds_per_step"], 3)
            summary[prefix + "peak_rss"] = round(results[impl]["peak_rss_gb"] / ref["peak_rss_gb"], 3)
    if ref:
        summary["first_loss_diff"] = max((abs(r["first_loss"] - ref["first_loss"]) for i, r in results.items()
                                          if i != "torch"), default=None)
    emit(summary)


if __name__ == "__main__":
    main()
