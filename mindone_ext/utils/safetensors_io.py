"""Read and write safetensors files with numpy only, bfloat16 included.

The `safetensors` package's numpy backend cannot represent bfloat16 (the dtype of the
official checkpoints), so the format is handled here directly: an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
Tensors are read lazily from a memory map, so peak memory stays near one tensor.
"""
import json
import os
import struct

import numpy as np

_NUMPY_OF = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAME_OF = {np.dtype(v): k for k, v in _NUMPY_OF.items() if k != "BF16"}
_MAX_HEADER = 100 * 1024 * 1024
_WRITE_CHUNK = 1 << 16  # elements encoded and written at a time


class SafetensorsError(ValueError):
    pass


def tensor_nbytes(dtype, shape):
    """Bytes a tensor of safetensors dtype `dtype` ("F32", "BF16", ...) and `shape` occupies."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(_NUMPY_OF[dtype]).itemsize


def bf16_bits_to_float32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x):
    # Round to nearest even, as torch does when casting float32 -> bfloat16.
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


def round_to_bf16(x):
    return bf16_bits_to_float32(float32_to_bf16_bits(x))


class SafetensorsFile:
    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{path}: corrupt or truncated safetensors file (header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except (ValueError, RecursionError) as e:
                raise SafetensorsError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + n
        for name, entry in header.items():
            _check_entry(path, name, entry)
            begin, end = entry["data_offsets"]
            expected = tensor_nbytes(entry["dtype"], entry["shape"])
            if end - begin != expected or self._data_start + end > size:
                raise SafetensorsError(f"{path}: corrupt or truncated safetensors file (tensor {name} out of bounds)")

    def keys(self):
        return list(self._entries)

    def shape(self, name):
        return tuple(self._entries[name]["shape"])

    def dtype_name(self, name):
        return self._entries[name]["dtype"]

    def get(self, name):
        """The tensor as a numpy array; bfloat16 is widened to float32 (exactly). Read with a plain
        file read, not a memory map: the process holds just this tensor, never the file's pages."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = bytearray(end - begin)  # read straight into the array's memory: one copy of the tensor
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(raw) != end - begin:
                raise SafetensorsError(f"{self.path}: truncated while reading tensor {name}")
        arr = np.frombuffer(raw, _NUMPY_OF[entry["dtype"]]).reshape(entry["shape"])
        return bf16_bits_to_float32(arr) if entry["dtype"] == "BF16" else arr


def _check_entry(path, name, entry):
    def natural(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    ok = (isinstance(entry, dict) and entry.get("dtype") in _NUMPY_OF and isinstance(entry.get("shape"), list)
          and all(natural(d) for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
          and len(entry["data_offsets"]) == 2 and all(natural(o) for o in entry["data_offsets"]))
    if not ok:
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        detail = f"unsupported dtype {dtype}" if isinstance(entry, dict) and dtype not in _NUMPY_OF else \
            "needs dtype, shape and data_offsets"
        raise SafetensorsError(f"{path}: corrupt safetensors header: tensor {name} {detail}")


def save_file(tensors, path, metadata=None, bf16_names=()):
    """Write {name: np.ndarray} to `path`; names in `bf16_names` are stored as bfloat16."""
    write_file(path, [(name, "BF16" if name in bf16_names else _NAME_OF[np.asarray(arr).dtype], np.shape(arr),
                       lambda arr=arr: arr) for name, arr in tensors.items()], metadata)


def encode(arr, dtype):
    """The bytes of `arr` stored as safetensors dtype `dtype` (floats are cast, BF16 rounded)."""
    if dtype == "BF16":
        return float32_to_bf16_bits(np.asarray(arr, np.float32)).tobytes()
    return np.ascontiguousarray(arr, _NUMPY_OF[dtype]).tobytes()


def write_file(path, entries, metadata=None):
    """Write a safetensors file from `entries` [(name, dtype, shape, fetch)] where `fetch()` returns
    the tensor: the header comes from the shapes, then each tensor is fetched, written and
    dropped, so memory holds one tensor at a time however large the file."""
    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        size = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, dtype, shape, fetch in entries:
            arr = fetch()
            if tuple(np.shape(arr)) != tuple(shape):
                raise SafetensorsError(f"tensor {name}: shape {list(np.shape(arr))}, expected {list(shape)}")
            flat = np.asarray(arr).reshape(-1)
            for start in range(0, flat.size, _WRITE_CHUNK):  # casts and copies bounded by the chunk
                f.write(encode(flat[start:start + _WRITE_CHUNK], dtype))
