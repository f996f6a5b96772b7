"""`BatchFeature`: what the processor returns, as in transformers: a dict that also reads as
attributes (`inputs.input_ids`), with its values as numpy arrays (`return_tensors="np"`, the
default) or `mindspore.Tensor` (`"ms"`). Either kind feeds `model.generate` directly."""
import numpy as np

TENSOR_TYPES = ("np", "ms")


def check_tensor_type(tensor_type):
    if tensor_type in (None, "np", "ms"):
        return tensor_type or "np"
    if tensor_type == "pt":
        raise ValueError("return_tensors='pt' asks for PyTorch tensors; this port returns 'ms' (mindspore.Tensor) "
                         "or 'np' (numpy), and generate() takes either")
    raise ValueError(f"return_tensors must be one of {', '.join(TENSOR_TYPES)}; got {tensor_type!r}")


class BatchFeature(dict):
    def __init__(self, data=None, tensor_type=None):
        super().__init__(data or {})
        self.convert_to_tensors(tensor_type)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no {name!r}; it holds {', '.join(self)}") from None

    def __getstate__(self):
        return dict(self)

    def __setstate__(self, state):
        self.update(state)

    def convert_to_tensors(self, tensor_type=None):
        kind = check_tensor_type(tensor_type)
        if kind == "np":
            for key, value in self.items():
                self[key] = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
        else:
            from mindspore import Tensor

            for key, value in self.items():
                self[key] = value if isinstance(value, Tensor) else Tensor(np.asarray(value))
        return self

    def to(self, target):
        """`to(mindspore dtype)` casts the floating-point values to it (as a tensor), leaving ids
        and masks as they are, as transformers' BatchFeature.to(dtype) does; `to(device)` (a
        name such as `model.device`) returns the batch unchanged: MindSpore places tensors on
        the device of its context."""
        import mindspore as ms

        if not isinstance(target, ms.dtype.Type):
            return self
        for key, value in self.items():
            array = value if isinstance(value, ms.Tensor) else ms.Tensor(np.asarray(value))
            if array.is_floating_point():
                self[key] = array.astype(target)
        return self
