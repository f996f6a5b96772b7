"""LoRA against Hugging Face PEFT on the reference Thinker: the same adapter gives the same logits
and the same gradients; files move both ways; alpha really scales; merging changes nothing."""
import json

import numpy as np
import pytest
import torch

import mindspore as ms
from mindone_ext import Qwen2_5OmniForConditionalGeneration
from mindone_ext.nn.lora import (ADAPTER_CONFIG, THINKER_LLM_TARGETS, LoraConfig, LoraError, apply_lora,
                                 load_adapter, lora_layers, merge_lora, save_adapter)
from mindone_ext.training import causal_lm_loss_sum
from tests.conftest import max_abs_diff

RANK, ALPHA = 4, 24  # alpha / rank = 6: a rank-as-alpha bug would scale by 1


def thinker_with_adapter(checkpoint, seed=0, **config):
    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(checkpoint, enable_audio_output=False).thinker
    return add_adapter(thinker, seed, **config)


def add_adapter(thinker, seed=0, **config):
    apply_lora(thinker, LoraConfig(**{"r": RANK, "lora_alpha": ALPHA, **config}), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for _, layer in lora_layers(thinker):  # B starts at zero; a non-zero B makes every gradient non-zero
        layer.lora_B.weight.set_data(ms.Tensor(rng.normal(0, 0.05, layer.lora_B.weight.shape).astype(np.float32)))
    return thinker


def peft_thinker(checkpoint, adapter_dir=None):
    from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    base = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, adapter_dir)
    return get_peft_model(base, PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=THINKER_LLM_TARGETS))


def copy_adapter_to_peft(thinker, peft_model):
    state = {}
    for name, layer in lora_layers(thinker):
        for part in ("lora_A", "lora_B"):
            state[f"base_model.model.{name}.{part}.default.weight"] = torch.tensor(getattr(layer, part).weight.asnumpy())
    result = peft_model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    return peft_model


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 400, size=(2, 12))
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = 400, 0  # left padding, as the processor pads
    labels = np.where(mask == 1, ids, -100)
    labels[:, :6] = -100  # the prompt is not learned
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_default_targets_are_the_thinker_llm_projections(tiny_checkpoint):
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint)
    names = apply_lora(model, LoraConfig())
    layers = model.config.thinker_config.text_config.num_hidden_layers
    assert len(names) == 7 * layers
    assert all(n.startswith("thinker.model.layers.") for n in names)  # not the talker's, not the encoders'
    trainable = model.trainable_params()
    assert len(trainable) == 2 * len(names) and all(".lora_" in p.name for p in trainable)
    every = list(model.get_parameters())
    assert len({p.name for p in every}) == len(every)


def test_encoder_targets_and_bad_targets(tiny_checkpoint):
    from mindone_ext.nn.lora import AUDIO_ATTENTION_TARGETS, VISION_ATTENTION_TARGETS

    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False).thinker
    names = apply_lora(thinker, LoraConfig(target_modules=f"({AUDIO_ATTENTION_TARGETS})|({VISION_ATTENTION_TARGETS})"))
    assert any(n.startswith("audio_tower.") for n in names) and any(n.startswith("visual.") for n in names)
    with pytest.raises(LoraError, match="already has LoRA adapters"):
        apply_lora(thinker, LoraConfig())
    fresh = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False).thinker
    with pytest.raises(LoraError, match="matched no layer"):
        apply_lora(fresh, LoraConfig(target_modules=["no_such_proj"]))
    with pytest.raises(LoraError, match="not Linear"):
        apply_lora(fresh, LoraConfig(target_modules=["mlp"]))
    with pytest.raises(LoraError, match="rank"):
        LoraConfig(r=0)


def test_lora_alpha_sets_the_scale(tiny_checkpoint):
    ids = np.arange(3, 14).reshape(1, -1)
    base = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False).thinker
    base_logits = base(input_ids=ids).logits.asnumpy()
    deltas = {}
    for alpha in (ALPHA, 2 * ALPHA):
        thinker = thinker_with_adapter(tiny_checkpoint, lora_alpha=alpha, target_modules=["lm_head"])
        assert lora_layers(thinker)[0][1].scaling == alpha / RANK
        deltas[alpha] = thinker(input_ids=ids).logits.asnumpy() - base_logits
    # lm_head is the last layer: its adapter adds exactly scaling * B A h, linear in alpha
    assert np.abs(deltas[ALPHA]).max() > 1e-2
    np.testing.assert_allclose(deltas[2 * ALPHA], 2 * deltas[ALPHA], rtol=1e-4, atol=1e-5)


def test_one_training_step_matches_peft(tiny_checkpoint, batch):
    thinker = thinker_with_adapter(tiny_checkpoint)
    params = thinker.trainable_params()
    tokens = int((batch["labels"][:, 1:] != -100).sum())

    def loss_fn():
        total, _ = causal_lm_loss_sum(thinker, batch)
        return total / tokens

    loss, grads = ms.value_and_grad(loss_fn, None, params)()
    reference = copy_adapter_to_peft(thinker, peft_thinker(tiny_checkpoint))
    out = reference(**{k: torch.tensor(v) for k, v in batch.items()})
    out.loss.backward()
    assert abs(float(loss.asnumpy()) - out.loss.item()) <= 1e-4
    want = {n.replace(".default", ""): p.grad.numpy() for n, p in reference.named_parameters() if p.requires_grad}
    got = {f"base_model.model.{p.name}": g.asnumpy() for p, g in zip(params, grads)}
    assert sorted(got) == sorted(want)
    assert min(np.abs(g).max() for g in want.values()) > 1e-6  # every gradient is really exercised
    assert max(max_abs_diff(got[k], want[k]) for k in want) <= 1e-4


def test_our_adapter_loads_in_peft_and_peft_adapter_loads_here(tiny_checkpoint, batch, tmp_path):
    thinker = thinker_with_adapter(tiny_checkpoint)
    save_adapter(thinker, tmp_path / "ours")
    with open(tmp_path / "ours" / ADAPTER_CONFIG) as f:
        assert json.load(f)["lora_alpha"] == ALPHA
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = thinker(input_ids=ids, attention_mask=mask).logits.asnumpy()
    with torch.no_grad():
        theirs = peft_thinker(tiny_checkpoint, str(tmp_path / "ours"))(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    assert max_abs_diff(ours[valid], theirs[valid]) <= 1e-4

    peft_model = copy_adapter_to_peft(thinker, peft_thinker(tiny_checkpoint))
    peft_model.save_pretrained(tmp_path / "peft")
    fresh = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False).thinker
    config = load_adapter(fresh, str(tmp_path / "peft"))
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    assert max_abs_diff(fresh(input_ids=ids, attention_mask=mask).logits.asnumpy()[valid], ours[valid]) <= 1e-5


def test_merged_weights_give_the_same_logits(tiny_checkpoint, batch):
    thinker = thinker_with_adapter(tiny_checkpoint)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    before = thinker(input_ids=ids, attention_mask=mask).logits.asnumpy()
    merge_lora(thinker)
    assert not lora_layers(thinker)
    assert "model.layers.0.self_attn.q_proj.weight" in dict(thinker.parameters_and_names())
    after = thinker(input_ids=ids, attention_mask=mask).logits.asnumpy()
    valid = mask.astype(bool)
    assert max_abs_diff(after[valid], before[valid]) <= 1e-4


def test_bad_adapter_folders(tiny_checkpoint, tmp_path):
    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False).thinker
    with pytest.raises(LoraError, match="no adapter_config.json"):
        load_adapter(thinker, str(tmp_path))
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True}))
    with pytest.raises(LoraError, match="does not implement.*use_dora"):
        load_adapter(thinker, str(tmp_path))
    other = thinker_with_adapter(tiny_checkpoint, target_modules=["q_proj"])
    save_adapter(other, tmp_path / "q_only")
    config = json.loads((tmp_path / "q_only" / ADAPTER_CONFIG).read_text())
    config["target_modules"] = ["q_proj", "k_proj"]  # weights for q_proj only
    (tmp_path / "q_only" / ADAPTER_CONFIG).write_text(json.dumps(config))
    fresh = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint).thinker
    with pytest.raises(LoraError, match="does not fit the model: missing"):
        load_adapter(fresh, str(tmp_path / "q_only"))
    assert not lora_layers(fresh) and not hasattr(fresh, "lora_config")  # left as it was


def peft_adapter(checkpoint, folder, **options):
    """A PEFT adapter on the reference Thinker with `options`, random (non-zero) B, saved to `folder`;
    returns the PEFT model."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    base = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    model = get_peft_model(base, PeftLoraConfig(**{"r": RANK, "lora_alpha": ALPHA, **options}))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("options", [
    dict(use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[0], layers_pattern="layers"),
], ids=["rslora+layers_to_transform", "layers_pattern"])
def test_rslora_and_layers_to_transform_equal_peft_both_ways(tiny_checkpoint, batch, tmp_path, options):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    valid = mask.astype(bool)
    theirs = peft_adapter(tiny_checkpoint, tmp_path / "peft", **options)
    with torch.no_grad():
        want = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    peft_names = sorted(n.split(".lora_A")[0][len("base_model.model."):] for n, _ in theirs.named_parameters()
                        if "lora_A" in n)
    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False).thinker
    load_adapter(thinker, str(tmp_path / "peft"))
    assert sorted(name for name, _ in lora_layers(thinker)) == peft_names  # the same layers, no others
    layer = 1 if options.get("use_rslora") else 0
    assert f"model.layers.{layer}.self_attn.q_proj" in peft_names
    assert all(f".{layer}." in name for name in peft_names)  # of the numbered layers, only that one
    scale = ALPHA / (RANK ** 0.5 if options.get("use_rslora") else RANK)
    assert all(cell.scaling == scale for _, cell in lora_layers(thinker))
    got = thinker(input_ids=ids, attention_mask=mask).logits.asnumpy()
    assert max_abs_diff(got[valid], want[valid]) <= 1e-4
    base = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False).thinker
    assert max_abs_diff(base(input_ids=ids, attention_mask=mask).logits.asnumpy()[valid], want[valid]) > 1e-3

    save_adapter(thinker, tmp_path / "ours")  # and back: PEFT reads our file the same way
    with torch.no_grad():
        again = peft_thinker(tiny_checkpoint, str(tmp_path / "ours"))(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert max_abs_diff(again[valid], want[valid]) <= 1e-5


@pytest.mark.parametrize("options, named", [
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' rewrites the base model's weights"),
    (dict(init_lora_weights="olora"), "init_lora_weights='olora' rewrites the base model's weights"),
    (dict(use_dora=True), "does not implement.*'use_dora': True"),
    (dict(modules_to_save=["lm_head"]), "does not implement.*'modules_to_save'"),
    (dict(rank_pattern={"q_proj": 2}), "does not implement.*'rank_pattern'"),
], ids=["pissa", "olora", "dora", "modules_to_save", "rank_pattern"])
def test_peft_adapters_we_cannot_apply_exactly_are_refused_by_name(tiny_checkpoint, tmp_path, options, named):
    """A PiSSA or OLoRA adapter is saved for a base PEFT rewrote: applied to the original base it
    would load without complaint and give other logits."""
    peft_adapter(tiny_checkpoint, tmp_path, target_modules=["q_proj", "v_proj"], **options)
    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False).thinker
    with pytest.raises(LoraError, match=named):
        load_adapter(thinker, str(tmp_path))
    assert not lora_layers(thinker) and not hasattr(thinker, "lora_config")


def test_a_whole_model_adapter_with_talker_layers_says_to_load_the_talker(tiny_checkpoint, tmp_path):
    whole = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint)
    apply_lora(whole, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"]))
    assert any(name.startswith("talker.") for name, _ in lora_layers(whole))
    save_adapter(whole, tmp_path)
    text_only = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False)
    with pytest.raises(LoraError, match=r"also adapts the Talker \(\d+ tensors.*enable_audio_output=True"):
        text_only.load_adapter(str(tmp_path))
    assert not lora_layers(text_only)
    Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint).load_adapter(str(tmp_path))  # loads whole


def runner_logits(model, ids, mask):
    """The compiled decoder's logits for the prompt's last two positions: all but the last token
    prefilled, then one decode step."""
    runner, thinker = model.thinker_runner(), model.thinker
    prepared = thinker.prepare_inputs(ids, mask)
    cache = runner.allocate(ids.shape[0], ids.shape[1], ms.float32)
    embeds, positions = prepared.inputs_embeds, prepared.position_ids
    prefilled, _ = runner.extend(cache, embeds[:, :-1], positions[..., :-1], mask[:, :-1])
    decoded, _ = runner.decode(cache, embeds[:, -1:], positions[..., -1:])
    cache.release()
    return np.stack([prefilled, decoded], 1)


def test_the_compiled_decoder_runs_unmerged_adapters(tiny_checkpoint, batch):
    """Generation with an adapter loaded and not merged: the compiled prefill and decode steps
    (weights and adapters as graph inputs) give the cells' logits (which equal PEFT's, above)."""
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    without = runner_logits(model, ids, mask)
    add_adapter(model.thinker)  # after the runner compiled: it must see the adapters
    want = model.thinker(input_ids=ids, attention_mask=mask).logits.asnumpy()[:, -2:]
    got = runner_logits(model, ids, mask)
    assert max_abs_diff(got, want) <= 1e-5
    assert max_abs_diff(got, without) > 1e-2  # the adapters did act
    merge_lora(model.thinker)  # and back to plain projections
    assert max_abs_diff(runner_logits(model, ids, mask), want) <= 1e-4
