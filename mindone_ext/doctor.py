"""Does this device run Qwen2.5-Omni right? One command, one verdict per stage.

    python -m mindone_ext.doctor                     # bfloat16, on the device MindSpore picks
    python -m mindone_ext.doctor --dtype float16 --json

Every stage of an answer (audio and vision encoders, Thinker prefill and decode, Talker, DiT,
BigVGAN, a LoRA training step) runs on a small random model (the tiny config: head size 16, so
flash attention applies) in the requested dtype, with flash attention off and on (on runs only
where MindSpore has the kernel: Ascend, half precision). Each result is compared with the exact
float32 path on the CPU, computed on the same weights and inputs in a child process, and timed
(the second run: the first compiles). A table (or JSON with --json) gives the verdict per stage and
the versions found; the exit status is 0 when every stage passes.
"""
import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

# A stage passes when max |result - exact| <= tolerance x max |exact|: float32 must agree with
# the exact path to float32 rounding; half precision rounds weights and activations (fp16: 10
# mantissa bits, bf16: 7) through several layers, as the checkpoint-loading tests allow.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}
ATTENTION = ("eager", "flash_attention_2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mindone_ext.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="bfloat16",
                        help="the dtype to check (default: bfloat16, the release checkpoints' own)")
    parser.add_argument("--device", default=None,
                        help="the MindSpore device to check (default: the one MindSpore picks, e.g. Ascend)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--exact", metavar="FILE", help=argparse.SUPPRESS)  # the child: float32 on CPU into FILE
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the model and its inputs

def tiny_model(dtype, attn_implementation):
    """The tiny-config model with deterministic random weights: each parameter's values depend
    only on its name, so every process and dtype gets the same ones (rounded to `dtype`)."""
    import mindspore as ms
    from mindspore import Tensor

    from .models.qwen2_5_omni.model import Qwen2_5OmniForConditionalGeneration
    from .models.qwen2_5_omni.tiny_config import tiny_config
    from .nn.layers import Embedding

    names = ["<|endoftext|>", "<|im_end|>", "<|AUDIO|>", "<|IMAGE|>", "<|VIDEO|>", "<|audio_bos|>", "<|audio_eos|>",
             "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "user_token"]
    config = tiny_config({name: 300 + i for i, name in enumerate(names)}, vocab=416)
    model = Qwen2_5OmniForConditionalGeneration(config, getattr(ms, dtype), attn_implementation)
    tables = {f"{cell_name}.weight" for cell_name, cell in model.cells_and_names() if isinstance(cell, Embedding)}
    for name, param in model.parameters_and_names():
        param.set_data(Tensor(initial_value(name, param.shape, name in tables)).astype(getattr(ms, dtype))
                       .astype(param.dtype))
    model.set_train(False)
    return model


def initial_value(name, shape, table):
    """O(0.1-1) activations: tables ~ N(0, 1), matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.01),
    scales ~ 1 + N(0, 0.01); the vocoder's last conv x0.02 keeps the waveform inside its clamp."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    value = rng.standard_normal(shape)
    if table:
        return value.astype(np.float32)
    if len(shape) >= 2:
        value *= float(np.prod(shape[1:])) ** -0.5 * (0.02 if "conv_post" in name else 1.0)
    elif name.endswith("bias"):
        value *= 0.1
    else:
        value = 1.0 + 0.1 * value
    return value.astype(np.float32)


def inputs(config):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(2, 40))
    mask = np.ones_like(ids)
    mask[1, :7] = 0  # left padding: rows no key is visible to
    vision = config.thinker_config.vision_config
    grid = np.array([[1, 12, 16]])  # several attention windows, full and windowed blocks
    # a frame past the scores budget (nn/attention.py SCORES_AT_ONCE): its full-attention blocks
    # run op by op, on flash attention without a mask
    large_grid = np.array([[1, 72, 72]])
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    return dict(
        mel=rng.standard_normal((config.thinker_config.audio_config.num_mel_bins, 230)).astype(np.float32),
        mel_lengths=np.array([130, 100]),  # two clips, each over several encoder windows
        pixels=rng.standard_normal((int(grid.prod()), patch)).astype(np.float32), grid=grid,
        large_pixels=rng.standard_normal((int(large_grid.prod()), patch)).astype(np.float32), large_grid=large_grid,
        ids=ids, mask=mask, next_ids=rng.integers(0, 256, size=(6, 2, 1)),
        talker_embeds=rng.standard_normal((1, 24, config.talker_config.embedding_size)).astype(np.float32),
        talker_next=rng.standard_normal((4, 1, 1, config.talker_config.embedding_size)).astype(np.float32),
        codes=rng.integers(0, 8000, size=(1, 30)),
        conditioning=rng.standard_normal((1, config.token2wav_config.dit_config.enc_emb_dim)).astype(np.float32),
        reference_mel=rng.standard_normal((1, 60, config.token2wav_config.dit_config.mel_dim)).astype(np.float32),
        noise=rng.standard_normal((1, 60, config.token2wav_config.dit_config.mel_dim)).astype(np.float32),
        mel_for_vocoder=rng.standard_normal((48, config.token2wav_config.bigvgan_config.mel_dim)).astype(np.float32),
        labels_from=25,
    )


# ---------------------------------------------------------------- the stages

def as_float32(x):
    import mindspore as ms

    if isinstance(x, ms.Tensor):
        x = x.astype(ms.float32).asnumpy()
    return np.asarray(x, np.float32)


def text_positions(mask):
    return np.broadcast_to(np.maximum(np.cumsum(mask, 1) - 1, 0), (3,) + mask.shape).astype(np.int64)


def run_decoder(runner, embeds, positions, mask, next_embeds):
    """Prefill then one decode step per entry of `next_embeds`: the logits of each, stacked."""
    cache = runner.allocate(embeds.shape[0], embeds.shape[1] + len(next_embeds), embeds.dtype)
    try:
        logits = [runner.prefill(cache, embeds, positions, mask)[0]]
        for i, e in enumerate(next_embeds):
            step_positions = np.broadcast_to(positions[..., -1:] + 1 + i, (3, e.shape[0], 1))
            logits.append(runner.decode(cache, e, step_positions)[0])
        return np.stack(logits)
    finally:
        cache.release()


def thinker(model, x, decode):
    """The prompt's prefill, and with `decode` the decode steps after it."""
    t = model.thinker
    nexts = [t.embed(i) for i in x["next_ids"]] if decode else []
    return run_decoder(model.thinker_runner(), t.embed(x["ids"]), text_positions(x["mask"]), x["mask"], nexts)


def talker(model, x):
    from mindspore import Tensor

    dtype = model.talker.thinker_to_talker_proj.weight.dtype
    embeds = Tensor(x["talker_embeds"]).astype(dtype)
    mask = np.ones(embeds.shape[:2], np.int64)
    nexts = [Tensor(e).astype(dtype) for e in x["talker_next"]]
    return run_decoder(model.talker_runner(), embeds, text_positions(mask), mask, nexts)


def lora_step(model, x):
    """Loss and gradients of LoRA adapters on the Thinker's attention and MLP projections."""
    import mindspore as ms
    from mindspore import Tensor

    from .nn.lora import LoraConfig, apply_lora
    from .training.loss import causal_lm_loss_sum

    thinker = model.thinker
    if not hasattr(thinker, "lora_config"):
        apply_lora(thinker, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, param in thinker.parameters_and_names():
            if "lora_" in name:  # B is zero after init: random both, so every gradient is non-zero
                param.set_data(Tensor(initial_value(name, param.shape, False)).astype(param.dtype))
    labels = np.where(np.arange(x["ids"].shape[1]) >= x["labels_from"], x["ids"], -100)
    batch = dict(input_ids=x["ids"], attention_mask=x["mask"], labels=labels)
    adapters = thinker.trainable_params()

    def loss():
        total, count = causal_lm_loss_sum(thinker, batch)
        return total / count

    value, grads = ms.value_and_grad(loss, None, adapters)()
    return np.concatenate([as_float32(value).reshape(1)] + [as_float32(g).reshape(-1) for g in grads])


STAGES = {
    "audio encoder": lambda m, x: m.thinker.audio_tower(x["mel"], x["mel_lengths"]),
    "vision encoder": lambda m, x: m.thinker.visual(x["pixels"], x["grid"]),
    "vision, large frame": lambda m, x: m.thinker.visual(x["large_pixels"], x["large_grid"]),
    "thinker prefill": lambda m, x: thinker(m, x, decode=False),
    "thinker prefill+decode": lambda m, x: thinker(m, x, decode=True),
    "talker": talker,
    "DiT (ODE, 4 steps)": lambda m, x: m.token2wav.sample_mel(x["codes"], x["conditioning"], x["reference_mel"],
                                                              num_steps=4, noise=x["noise"]),
    "BigVGAN": lambda m, x: m.token2wav.vocoder(x["mel_for_vocoder"]),
    "LoRA step": lora_step,
}
# the stages with attention, which flash attention changes
ATTENTION_STAGES = ("audio encoder", "vision encoder", "vision, large frame", "thinker prefill",
                    "thinker prefill+decode", "talker", "LoRA step")


def run_stages(dtype, attn_implementation, names):
    """{stage: (float32 result, seconds of the second run, error message or None)}."""
    model = tiny_model(dtype, attn_implementation)
    x = inputs(model.config)
    results = {}
    for name in names:
        try:
            as_float32(STAGES[name](model, x))  # the first run compiles
            start = time.perf_counter()
            out = as_float32(STAGES[name](model, x))
            results[name] = (out, time.perf_counter() - start, None)
        except Exception as e:  # a stage that fails is a verdict, not the end of the check
            results[name] = (None, None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    return results


# ---------------------------------------------------------------- the report

def versions():
    import mindspore as ms
    found = {"python": platform.python_version(), "mindspore": ms.__version__, "numpy": np.__version__,
             "device": ms.get_context("device_target"), "cann": cann_version()}
    return found


def cann_version():
    """The CANN toolkit's version from its version file, or None where there is none."""
    roots = [os.environ.get("ASCEND_HOME_PATH"), os.environ.get("ASCEND_TOOLKIT_HOME"),
             "/usr/local/Ascend/ascend-toolkit/latest"]
    for root in filter(None, roots):
        for path in sorted(glob.glob(os.path.join(root, "*", "ascend_toolkit_install.info")) +
                           glob.glob(os.path.join(root, "version.cfg")) +
                           glob.glob(os.path.join(root, "*", "version.info"))):
            with open(path, errors="replace") as f:
                for line in f:
                    key, _, value = line.partition("=")
                    if key.strip().lower() in ("version", "runtime_running_version", "toolkit_installed_version"):
                        return value.strip().strip("[]\"'").split(":")[-1]
    return None


def compare(got, want, tolerance):
    if got.shape != want.shape:
        return None, f"shape {got.shape}, exact path {want.shape}"
    if not np.isfinite(got).all():
        return None, "non-finite values"
    error = float(np.abs(got.astype(np.float64) - want).max() / max(float(np.abs(want).max()), 1e-30))
    return error, None if error <= tolerance else f"error {error:.2e} > {tolerance:.0e}"


def exact_results():
    """The exact float32 path on the CPU, in a child process (a process has one device)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "exact.npz")
        done = subprocess.run([sys.executable, "-m", "mindone_ext.doctor", "--exact", path], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: the exact float32 reference run failed:\n{done.stderr[-2000:]}")
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}


def check(args):
    import mindspore as ms

    from .nn.attention import use_flash
    from .nn.device import keep_dtypes_exact

    want = exact_results()
    if args.device:
        ms.set_device(args.device)
    precision = keep_dtypes_exact()
    rows = []
    for attn in ATTENTION:
        flash_here = use_flash(attn, getattr(ms, args.dtype), 16)  # the tiny config's head size
        names = list(STAGES) if attn == "eager" else [n for n in ATTENTION_STAGES if flash_here]
        if attn != "eager" and not flash_here:
            rows.append(dict(stage="(attention stages)", attention=attn, dtype=args.dtype, seconds=None, error=None,
                             verdict="not run: flash attention runs on Ascend in float16/bfloat16 only"))
            continue
        for name, (got, seconds, failure) in run_stages(args.dtype, attn, names).items():
            error, problem = (None, failure) if failure else compare(got, want[name], TOLERANCE[args.dtype])
            rows.append(dict(stage=name, attention=attn, dtype=args.dtype, seconds=seconds, error=error,
                             verdict="ok" if problem is None else f"FAIL: {problem}"))
    return dict(versions=versions(), precision=precision, tolerance=TOLERANCE[args.dtype], stages=rows,
                passed=all(r["verdict"] == "ok" or r["verdict"].startswith("not run") for r in rows))


def table(report):
    v = report["versions"]
    lines = [f"device {v['device']} | MindSpore {v['mindspore']} | CANN {v['cann'] or 'not found'} | "
             f"Python {v['python']} | numpy {v['numpy']}",
             *([f"op precision: {', '.join(f'{k} {v}' for k, v in report['precision'].items())}"]
               if report.get("precision") else []),
             f"each stage against the exact float32 path on the CPU; passes at max error <= "
             f"{report['tolerance']:.0e} x max |exact|", ""]
    header = f"{'stage':<22} {'attention':<18} {'dtype':<9} {'ms':>9} {'error':>9}  verdict"
    lines += [header, "-" * len(header)]
    for r in report["stages"]:
        ms_ = "" if r["seconds"] is None else f"{1000 * r['seconds']:.1f}"
        error = "" if r["error"] is None else f"{r['error']:.1e}"
        lines.append(f"{r['stage']:<22} {r['attention']:<18} {r['dtype']:<9} {ms_:>9} {error:>9}  {r['verdict']}")
    lines += ["", "verdict: all stages pass" if report["passed"] else "verdict: some stages FAIL (see above)"]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.exact:
        import mindspore as ms

        ms.set_device("CPU")
        results = run_stages("float32", "eager", list(STAGES))
        failed = {name: r[2] for name, r in results.items() if r[2]}
        if failed:
            raise SystemExit(f"error: the exact path failed on the CPU: {failed}")
        np.savez(args.exact, **{name: r[0] for name, r in results.items()})
        return 0
    report = check(args)
    print(json.dumps(report, indent=1) if args.json else table(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
