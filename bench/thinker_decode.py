"""Thinker text decoding, ours against the PyTorch reference on the same random weights.

    python bench/thinker_decode.py                  # Qwen2.5-0.5B-shaped thinker, fp32, CPU
    python bench/thinker_decode.py --context 4096   # decoding after a 4096-token prompt
    python bench/thinker_decode.py --tiny           # a few-second smoke run

Prints one JSON line per implementation (prefill ms for the prompt, decode tokens/s) and a
summary line with ratios ours / reference. Each token is time-stamped as it is produced (ours:
`generate_stream`'s text events; the reference: a logits processor, called once per token), so
decode rate = (new - 1) / (last stamp - first stamp) and prefill = the first stamp: median of
repeats, after a warm-up call (which includes our graph compilation).

Ours also reports, at the cache size the run used (`cache_slots`), what writing one token into
every layer's keys and values costs per decode step, timed alone in the same run: our in-place
write (`kv_write_ms_per_token`: `scatter_update` of the new slots into the cache's Parameters) and
the whole-buffer rewrite it replaced (`kv_rewrite_ms_per_token`: a functional `where` that
returns every buffer anew).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_weights, emit, median_seconds  # noqa: E402

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000),
}


def build_config(shape):
    from transformers import Qwen2_5OmniConfig

    text = dict(SHAPES[shape], rope_theta=1000000.0, max_position_embeddings=32768,
                rope_scaling={"mrope_section": [8, 12, 12] if shape != "tiny" else [2, 3, 3], "rope_type": "default",
                              "type": "default"})
    tiny_audio = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=text["hidden_size"])
    tiny_vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                       fullatt_block_indexes=[0])
    return Qwen2_5OmniConfig(thinker_config=dict(text_config=text, audio_config=tiny_audio, vision_config=tiny_vision,
                                                 vision_start_token_id=151652),
                             enable_audio_output=False)


def kv_write_seconds(text_config, slots, repeats):
    """One decode step's cache writes alone, into buffers of `slots` slots (every layer's keys and
    values, one new token each): (in place, whole buffers rewritten)."""
    import mindspore as ms
    from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

    from mindone_ext.nn.decoder import head_dim_of

    kv, d = text_config.num_key_value_heads, head_dim_of(text_config)
    shape, count = (1, kv, slots, d), 2 * text_config.num_hidden_layers
    new = Tensor(np.ones((kv, d), np.float32))
    start = slots // 2

    class InPlace(nn.Cell):  # as generation.cache_pool.PoolBuffers holds a cache
        def __init__(self):
            super().__init__()
            self.buffers = ParameterTuple([Parameter(ops.zeros((kv * slots, d), ms.float32), name=f"kv{i}",
                                                     requires_grad=False) for i in range(count)])

        def construct(self, index):
            done = index
            for b in self.buffers:
                done = ops.depend(done, ops.scatter_update(b, index, new))
            return done

    in_place, index = InPlace(), Tensor(np.arange(kv, dtype=np.int32) * slots + start)
    step_in_place = ms.jit(in_place.construct)

    @ms.jit
    def rewrite_all(buffers, start):
        inside = (ops.arange(slots) == start).reshape(1, 1, slots, 1)
        return tuple(ops.where(inside, new.reshape(1, kv, 1, d), b) for b in buffers)

    state = {"buffers": tuple(ops.zeros(shape, ms.float32) for _ in range(count))}

    def rewrite():
        state["buffers"] = rewrite_all(ms.mutable(state["buffers"]), Tensor(start, ms.int32))
        state["buffers"][-1].asnumpy()

    repeats = max(repeats, 5)
    return (median_seconds(lambda: step_in_place(index).asnumpy(), repeats), median_seconds(rewrite, repeats))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--context", type=int, default=None, help="the prompt's length (alias of --prompt_len)")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.context:
        args.prompt_len = args.context
    shape = "tiny" if args.tiny else "qwen2.5-0.5b"

    import torch
    import mindspore as ms
    from transformers import LogitsProcessorList
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    from mindone_ext import Qwen2_5OmniForConditionalGeneration
    from mindone_ext.generation.cache_pool import cache_slots

    config = build_config(shape)
    torch.manual_seed(0)
    reference = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config).eval()
    ours = Qwen2_5OmniForConditionalGeneration(config, ms.float32, enable_audio_output=False)
    copy_weights(reference, ours, prefix="thinker.")

    ids = np.random.default_rng(0).integers(0, SHAPES[shape]["vocab_size"], size=(1, args.prompt_len))
    common = dict(shape=shape, batch=1, prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype="float32",
                  device="CPU", torch_threads=torch.get_num_threads())

    def stamps_ours(n):
        events = ours.generate_stream(input_ids=ids, max_new_tokens=n, return_audio=False, eos_token_id=[])
        start = time.perf_counter()
        stamps, tokens = [], []
        for event in events:
            stamps.append(time.perf_counter() - start)
            tokens.append(event.token_id)
        return stamps, tokens

    class Stamp:  # a logits processor: called once per generated token, after its forward
        def __init__(self):
            self.start, self.stamps = time.perf_counter(), []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter() - self.start)
            return scores

    def stamps_reference(n):
        stamp = Stamp()
        with torch.no_grad():
            out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                                     max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
        return stamp.stamps, out[0, ids.shape[1]:].tolist()

    n = args.new_tokens
    same = stamps_ours(n)[1] == stamps_reference(n)[1]  # also the warm-up (our graphs compile)
    results = {}
    for impl, run in (("mindone_ext", stamps_ours), ("torch", stamps_reference)):
        runs = [run(n)[0] for _ in range(args.repeats)]
        results[impl] = dict(prefill_ms=round(statistics.median(r[0] for r in runs) * 1e3, 2),
                             decode_tok_s=round(statistics.median((n - 1) / (r[-1] - r[0]) for r in runs), 2))
        if impl == "mindone_ext":
            slots = cache_slots(args.prompt_len + n)
            write, rewrite = kv_write_seconds(config.thinker_config.text_config, slots, args.repeats)
            results[impl].update(cache_slots=slots, kv_write_ms_per_token=round(write * 1e3, 3),
                                 kv_rewrite_ms_per_token=round(rewrite * 1e3, 2))
        emit(dict(bench="thinker_decode", impl=impl, **results[impl], **common))
    emit(dict(bench="thinker_decode",
              ratio_decode_tok_s=round(results["mindone_ext"]["decode_tok_s"] / results["torch"]["decode_tok_s"], 3),
              ratio_prefill_ms=round(results["mindone_ext"]["prefill_ms"] / results["torch"]["prefill_ms"], 3),
              greedy_tokens_identical=same))


if __name__ == "__main__":
    main()
