"""The compiled training step (each decoder layer's forward and backward as graphs, the loss head
as one more, the encoders op by op) against the op-by-op one: the same loss and gradients, with and
without recompute, whichever projections carry adapters and with the encoders' adapters, and the
same loss curve over optimizer steps."""
import os
import sys

import numpy as np
import pytest
import mindspore as ms

from mindone_ext import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor
from mindone_ext.nn.lora import (AUDIO_ATTENTION_TARGETS, THINKER_LLM_TARGETS, VISION_ATTENTION_TARGETS, LoraConfig,
                                 apply_lora, lora_layers)
from mindone_ext.training import AdamW, Collator, ConversationDataset, causal_lm_loss_sum
from mindone_ext.nn.device import on_ascend
from mindone_ext.training.compiled import CompiledLossGrad
from mindone_ext.training.layer_grad import layer_parts
from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples", "qwen2_5_omni"))
from demo_media import write_asr_dataset, write_ocr_dataset  # noqa: E402


def adapted_thinker(checkpoint, model_options=None, **config):
    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(checkpoint, enable_audio_output=False,
                                                                  **(model_options or {})).thinker
    apply_lora(thinker, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **config), seed=0)
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(thinker):  # a non-zero B: every gradient is exercised
        layer.lora_B.weight.set_data(ms.Tensor(rng.normal(0, 0.05, layer.lora_B.weight.shape).astype(np.float32)))
    thinker.set_train(True)
    return thinker


def text_batch(length, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 400, size=(2, length))
    mask = np.ones_like(ids)
    ids[1, :4], mask[1, :4] = 400, 0  # left padding, as the collator pads
    labels = np.where(mask == 1, ids, -100)
    labels[:, :length // 2] = -100  # the prompt is not learned
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# Some projections plain and one layer without any adapter: every kind of layer graph.
SOME_PROJECTIONS = dict(target_modules=r"model\.layers\.1\.(self_attn\.(q|v)_proj|mlp\.down_proj)")


@pytest.mark.parametrize("length,recompute,config", [
    (13, False, {}), (64, False, {}), (65, False, {}),  # padded to the bucket, exactly a bucket, just past one
    (13, True, {}), (65, True, SOME_PROJECTIONS), (64, False, SOME_PROJECTIONS)])
def test_loss_and_gradients_equal_the_op_by_op_step(tiny_checkpoint, length, recompute, config):
    thinker = adapted_thinker(tiny_checkpoint, **config)
    assert_equal_steps(thinker, text_batch(length, length), recompute)


def assert_equal_steps(thinker, batch, recompute=False, scale=0.37, rtol=1e-4, atol=1e-6):
    params = thinker.trainable_params()
    loss, grads = CompiledLossGrad(thinker, params, recompute)(batch, scale)
    want_loss, want_grads = ms.value_and_grad(lambda: causal_lm_loss_sum(thinker, batch)[0] * scale, None, params)()
    np.testing.assert_allclose(loss.asnumpy(), want_loss.asnumpy(), rtol=rtol)
    assert min(np.abs(g.asnumpy()).max() for g in want_grads) > 1e-6
    for param, got, want in zip(params, grads, want_grads):
        np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=rtol, atol=atol, err_msg=param.name)


def test_half_precision_with_flash_attention(tiny_checkpoint):
    """float16 base weights with flash_attention_2: on Ascend the layers' graphs run the flash kernel
    and its gradient; elsewhere the exact path in float16. Either way the op-by-op step's gradients."""
    thinker = adapted_thinker(tiny_checkpoint, dict(mindspore_dtype=ms.float16, attn_implementation="flash_attention_2"))
    assert {layer_parts(layer, "silu")[0].flash for layer in thinker.model.layers} == {on_ascend()}
    assert_equal_steps(thinker, text_batch(40, 3), rtol=2e-2, atol=1e-3)


def test_encoder_adapters_get_the_op_by_op_gradients(tiny_checkpoint, tmp_path):
    """Adapters on the audio and vision encoders too, on a batch of a spoken and a pictured row."""
    processor = Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)
    speech = ConversationDataset(write_asr_dataset(str(tmp_path / "asr"), n=1), prompt="Transcribe.")
    images = ConversationDataset(write_ocr_dataset(str(tmp_path / "ocr"), n=1), prompt="Formula?")
    batch = Collator(processor)([speech[0], images[0]])
    assert batch["input_features"] is not None and batch["pixel_values"] is not None
    targets = f"({THINKER_LLM_TARGETS})|({AUDIO_ATTENTION_TARGETS})|({VISION_ATTENTION_TARGETS})"
    thinker = adapted_thinker(tiny_checkpoint, target_modules=targets)
    names = [p.name for p in thinker.trainable_params()]
    assert any("audio_tower" in n for n in names) and any("visual" in n for n in names)
    assert_equal_steps(thinker, batch)


def test_the_loss_curve_equals_the_op_by_op_one(tiny_checkpoint):
    curves = []
    for compiled in (False, True):
        thinker = adapted_thinker(tiny_checkpoint)
        params = thinker.trainable_params()
        optimizer, step = AdamW(params, lr=1e-2), CompiledLossGrad(thinker, params)
        curve = []
        for i in range(20):  # the measure: the first 20 steps within 1e-4
            batch = text_batch(20 + 9 * (i % 7), i)  # lengths across several buckets
            if compiled:
                loss, grads = step(batch)
            else:
                loss, grads = ms.value_and_grad(lambda: causal_lm_loss_sum(thinker, batch)[0], None, params)()
            optimizer.step(grads)
            curve.append(float(loss.asnumpy()))
        curves.append(curve)
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-4)
    assert curves[0][-1] != curves[0][0]


def test_adapters_outside_the_language_model_and_encoders_are_refused(tiny_checkpoint):
    thinker = adapted_thinker(tiny_checkpoint, target_modules=r"lm_head")
    with pytest.raises(ValueError, match="language model and the encoders; lm_head"):
        CompiledLossGrad(thinker, thinker.trainable_params())
