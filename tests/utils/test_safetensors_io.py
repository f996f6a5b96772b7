import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load_file, save_file as torch_save_file

from mindone_ext.utils.safetensors_io import SafetensorsError, SafetensorsFile, round_to_bf16, save_file


def test_reads_what_the_reference_library_writes_bf16_included(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.arange(6).reshape(2, 3),
               "d": torch.randn(2, 2).half(), "empty": torch.zeros(0, 4)}
    torch_save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(str(tmp_path / "x.safetensors"))
    assert sorted(f.keys()) == sorted(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(f.get(name), t.float().numpy() if t.is_floating_point() else t.numpy())
    assert f.dtype_name("b") == "BF16" and f.shape("a") == (3, 5)


def test_writes_what_the_reference_library_reads(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    save_file({"x": x, "y": x, "i": np.arange(5)}, str(tmp_path / "o.safetensors"), metadata={"format": "pt"},
              bf16_names={"y"})
    back = torch_load_file(tmp_path / "o.safetensors")
    np.testing.assert_array_equal(back["x"].numpy(), x)
    assert back["y"].dtype == torch.bfloat16
    np.testing.assert_array_equal(back["y"].float().numpy(), torch.tensor(x).bfloat16().float().numpy())
    np.testing.assert_array_equal(round_to_bf16(x), torch.tensor(x).bfloat16().float().numpy())


@pytest.mark.parametrize("content, message", [
    (b"", "not a safetensors file"),
    (b"\xff" * 8 + b"{}", "corrupt or truncated"),
    (len(b"{nope").to_bytes(8, "little") + b"{nope", "corrupt safetensors header"),
])
def test_corrupt_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsError, match=message) as e:
        SafetensorsFile(str(path))
    assert "bad.safetensors" in str(e.value)


def test_truncated_data_is_detected(tmp_path):
    torch_save_file({"w": torch.randn(100)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-10])
    with pytest.raises(SafetensorsError, match="out of bounds"):
        SafetensorsFile(str(tmp_path / "t.safetensors"))
