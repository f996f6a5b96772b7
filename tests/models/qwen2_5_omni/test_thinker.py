"""The Thinker's text path against the PyTorch reference on the same tiny checkpoint."""
import numpy as np
import pytest
import torch

from tests.conftest import max_abs_diff


def reference_logits(reference_model, ids, mask):
    with torch.no_grad():
        return reference_model.thinker(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_logits_match_reference_batch_with_left_padding(our_model, reference_model, padded_batch):
    ids, mask = padded_batch
    want = reference_logits(reference_model, ids, mask)
    out = our_model.thinker(input_ids=ids, attention_mask=mask)
    got = out.logits.asnumpy()
    valid = mask.astype(bool)  # padded positions carry no meaning in either implementation
    assert np.abs(want[valid]).mean() > 0.1, "reference logits too small for the tolerance to mean anything"
    assert max_abs_diff(got[valid], want[valid]) <= 1e-4
    assert got.shape == want.shape


def test_logits_with_explicit_position_ids_and_embeds(our_model, reference_model):
    ids = np.arange(5, 16).reshape(1, -1)
    positions = np.stack([np.arange(11) * k + 3 for k in (1, 2, 3)])[:, None, :]  # distinct t/h/w sections
    with torch.no_grad():
        want = reference_model.thinker(input_ids=torch.tensor(ids), position_ids=torch.tensor(positions),
                                       attention_mask=torch.ones(1, 11, dtype=torch.long)).logits.numpy()
    embeds = our_model.thinker.embed(ids)
    got = our_model.thinker(inputs_embeds=embeds, position_ids=positions).logits.asnumpy()
    assert max_abs_diff(got, want) <= 1e-4


def test_thinker_rejects_ambiguous_inputs(our_model):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        our_model.thinker()


def reference_generate(reference_model, ids, mask, **kwargs):
    with torch.no_grad():
        return reference_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                        return_audio=False, **kwargs).numpy()


def test_greedy_generation_matches_reference_token_for_token(our_model, reference_model, padded_batch):
    ids, mask = padded_batch
    want = reference_generate(reference_model, ids, mask, thinker_max_new_tokens=32, thinker_do_sample=False,
                              thinker_eos_token_id=None)
    got = our_model.generate(return_audio=False, input_ids=ids, attention_mask=mask, thinker_max_new_tokens=32, eos_token_id=[])
    assert want.shape == (2, ids.shape[1] + 32)
    np.testing.assert_array_equal(got, want)


def test_stop_tokens_and_padding_of_finished_rows_match_reference(our_model, reference_model, padded_batch):
    ids, mask = padded_batch
    free = reference_generate(reference_model, ids, mask, thinker_max_new_tokens=12, thinker_do_sample=False,
                              thinker_eos_token_id=None)
    stop = int(free[0, ids.shape[1] + 3])  # row 0 emits this at its 4th step
    kwargs = dict(thinker_max_new_tokens=12, thinker_do_sample=False, thinker_eos_token_id=stop, thinker_pad_token_id=400)
    want = reference_generate(reference_model, ids, mask, **kwargs)
    got = our_model.generate(return_audio=False, input_ids=ids, attention_mask=mask, thinker_max_new_tokens=12, eos_token_id=stop,
                             pad_token_id=400)
    np.testing.assert_array_equal(got, want)
    row = got[0, ids.shape[1]:]
    first_stop = int(np.flatnonzero(row == stop)[0])  # row 0 emits the stop token by its 4th step...
    assert first_stop <= 3 and (row[first_stop + 1:] == 400).all()  # ...and is padded from then on


def test_greedy_with_repetition_penalty_matches_reference(our_model, reference_model, padded_batch):
    ids, mask = padded_batch
    want = reference_generate(reference_model, ids, mask, thinker_max_new_tokens=16, thinker_do_sample=False,
                              thinker_repetition_penalty=1.3, thinker_eos_token_id=None)
    got = our_model.generate(return_audio=False, input_ids=ids, attention_mask=mask, max_new_tokens=16, repetition_penalty=1.3,
                             eos_token_id=[])
    np.testing.assert_array_equal(got, want)


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k(our_model, padded_batch):
    ids, mask = padded_batch
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.8,
                  top_k=1, eos_token_id=[])
    greedy = our_model.generate(return_audio=False, input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    np.testing.assert_array_equal(our_model.generate(return_audio=False, **kwargs, seed=3), greedy)  # top_k=1 is greedy
    a = our_model.generate(return_audio=False, **dict(kwargs, top_k=0, temperature=2.0), seed=5)
    b = our_model.generate(return_audio=False, **dict(kwargs, top_k=0, temperature=2.0), seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, greedy)


def test_generation_input_errors(our_model):
    ids = np.ones((1, 4), np.int64)
    with pytest.raises(ValueError, match="left padded"):
        our_model.generate(return_audio=False, input_ids=ids, attention_mask=np.array([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="exceeds the context length 4096"):
        our_model.generate(return_audio=False, input_ids=ids, max_new_tokens=5000)
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        our_model.generate(return_audio=False, input_ids=np.ones(4, np.int64))
    with pytest.raises(ValueError, match="batch size 1"):
        our_model.generate(input_ids=np.ones((2, 4), np.int64))


def test_thinker_rejects_unknown_arguments(our_model):
    with pytest.raises(TypeError, match="unexpected keyword argument.*pixel_value\\b"):
        our_model.thinker(input_ids=np.arange(4).reshape(1, -1), pixel_value=np.zeros(3))
