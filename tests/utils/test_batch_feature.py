"""BatchFeature: what the processor returns, read as transformers' users read it."""
import pickle

import mindspore as ms
import numpy as np
import pytest

from mindone_ext.utils.batch_feature import BatchFeature


def batch(tensor_type=None):
    return BatchFeature({"input_ids": np.array([[1, 2, 3]], np.int64), "pixel_values": np.ones((2, 4), np.float32),
                         "video_second_per_grid": [1.0]}, tensor_type)


def test_keys_read_as_attributes_and_a_missing_one_names_what_is_there():
    inputs = batch()
    assert inputs.input_ids is inputs["input_ids"] and isinstance(inputs.video_second_per_grid, np.ndarray)
    with pytest.raises(AttributeError, match="no 'pixel_values_videos'; it holds input_ids, pixel_values"):
        inputs.pixel_values_videos
    assert dict(pickle.loads(pickle.dumps(inputs))).keys() == inputs.keys()


def test_return_tensors_np_ms_and_a_clear_refusal_of_pt():
    as_ms = batch("ms")
    assert all(isinstance(v, ms.Tensor) for v in as_ms.values()) and as_ms.input_ids.dtype == ms.int64
    back = as_ms.convert_to_tensors("np")
    assert all(isinstance(v, np.ndarray) for v in back.values()) and back["pixel_values"].dtype == np.float32
    with pytest.raises(ValueError, match="'pt' asks for PyTorch tensors; this port returns 'ms'"):
        batch("pt")
    with pytest.raises(ValueError, match="one of np, ms; got 'tf'"):
        batch("tf")


def test_to_a_dtype_casts_floats_only_and_to_a_device_changes_nothing():
    inputs = batch().to(ms.float16)
    assert inputs.pixel_values.dtype == ms.float16 and inputs.video_second_per_grid.dtype == ms.float16
    assert isinstance(inputs.input_ids, np.ndarray) and inputs.input_ids.dtype == np.int64
    same = batch()
    assert same.to("CPU") is same and isinstance(same.pixel_values, np.ndarray)
