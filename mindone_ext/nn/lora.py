"""LoRA: low-rank adapters wrapped around chosen Linear layers, by name, from outside the model.

`apply_lora(model, LoraConfig(...))` replaces every matching `Linear` with a `LoraLinear` that
keeps the original as `base_layer` and adds `lora_B(lora_A(dropout(x))) * scaling` (lora_alpha / r,
or lora_alpha / sqrt(r) with rsLoRA).
Afterwards only the adapters are trainable. The module names, the adapter file
(`adapter_model.safetensors`, tensors named `base_model.model.<module>.lora_A.weight`) and
`adapter_config.json` are those Hugging Face PEFT writes and reads, so adapters move both ways
between this port and PyTorch. `merge_lora` folds the adapters into the base weights and puts
the plain layers back: inference then costs exactly what the base model costs.
"""
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import List, Optional, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..utils.atomic_file import written_atomically
from ..utils.safetensors_io import SafetensorsFile, save_file
from .layers import Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# The Thinker's language model: attention and MLP projections of every decoder layer, whether
# LoRA is applied to the whole model (`thinker.model.layers...`) or to the Thinker alone. The
# Talker's layers have the same names under `talker.`, so a plain list of suffixes would catch
# them too.
THINKER_LLM_TARGETS = r"(thinker\.)?model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# Attention projections of the audio and vision encoders, for adapting perception as well.
AUDIO_ATTENTION_TARGETS = r"(thinker\.)?audio_tower\.layers\.\d+\.self_attn\.(q|k|v|out)_proj"
VISION_ATTENTION_TARGETS = r"(thinker\.)?visual\.blocks\.\d+\.attn\.(q|k|v|proj)"


class LoraError(ValueError):
    """An adapter that cannot be applied or loaded as asked; the message names the problem."""


# How each field of PEFT's LoraConfig is treated when an adapter is loaded.
# Understood and applied:
IMPLEMENTED = ("r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path", "use_rslora",
               "layers_to_transform", "layers_pattern", "init_lora_weights")
# Bookkeeping, or settings of a way of initialising that leaves a trained adapter's meaning alone:
NO_EFFECT = ("peft_type", "task_type", "auto_mapping", "revision", "inference_mode", "megatron_config",
             "megatron_core", "runtime_config", "eva_config", "corda_config", "loftq_config", "qalora_group_size")
# Initialisations that leave the base weights as they are (the trained A and B are all there is);
# pissa*, corda, olora and loftq rewrite the base weights, so their adapters mean something else
# on the original base.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclass
class LoraConfig:
    """The fields of PEFT's LoraConfig that this port implements (the others keep PEFT's defaults).

    `target_modules` follows PEFT: a string is a regular expression the whole module name must
    match; a list matches a module whose name equals an entry or ends with "." + entry.
    `layers_to_transform` (an index or a list) keeps, of those, the ones in the numbered layers
    given (the number after `layers_pattern`, or after any name, as PEFT finds it); `use_rslora`
    scales by lora_alpha / sqrt(r) instead of lora_alpha / r.
    """
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Union[str, List[str]] = THINKER_LLM_TARGETS
    base_model_name_or_path: Optional[str] = None
    use_rslora: bool = False
    layers_to_transform: Optional[Union[int, List[int]]] = None
    layers_pattern: Optional[Union[str, List[str]]] = None
    init_lora_weights: Union[bool, str] = True

    def __post_init__(self):
        if not (isinstance(self.r, int) and self.r > 0):
            raise LoraError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0 <= self.lora_dropout < 1:
            raise LoraError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.target_modules:
            raise LoraError("target_modules is empty: name the layers to adapt")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise LoraError("layers_to_transform and layers_pattern need target_modules as a list of names "
                            "(as in PEFT): a regular expression names the layers itself")
        if self.layers_pattern and not self.layers_to_transform:
            raise LoraError("layers_pattern needs layers_to_transform (as in PEFT)")
        if self.init_lora_weights not in PLAIN_INITS:
            raise LoraError(
                f"init_lora_weights={self.init_lora_weights!r} rewrites the base model's weights when the adapter is "
                "made, so the adapter does not apply to the original base: convert it to a plain LoRA with PEFT "
                "first (save_pretrained(..., path_initial_model_for_weight_conversion=...)), or merge it in PyTorch")

    @property
    def scaling(self):
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, name):
        targets = self.target_modules
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        if name in targets:  # named whole: PEFT applies no layer filter then
            return True
        return any(name.endswith("." + t) for t in targets) and self._in_transformed_layer(name)

    def _in_transformed_layer(self, name):
        """PEFT's rule: the layer number is the first `.N.` after a `layers_pattern` name (or
        after any name when there is none); a name without one is not transformed."""
        wanted = self.layers_to_transform
        if wanted is None or wanted == []:
            return True
        patterns = self.layers_pattern
        patterns = [patterns] if isinstance(patterns, str) else (patterns or [])
        found = None
        for pattern in patterns or [r"[^.]*"]:
            found = re.match(rf".*\.{pattern}\.(\d+)\.", name)
            if found is not None:
                break
        if found is None:
            return False
        index = int(found.group(1))
        return index == wanted if isinstance(wanted, int) else index in wanted

    def to_peft_dict(self):
        d = asdict(self)
        d.update(peft_type="LORA", bias="none", fan_in_fan_out=False, use_dora=False, inference_mode=True,
                 modules_to_save=None, rank_pattern={}, alpha_pattern={})
        return d

    @classmethod
    def from_peft_dict(cls, d):
        if not isinstance(d, dict):
            raise LoraError(f"adapter config is a {type(d).__name__}, not a JSON object")
        if d.get("peft_type", "LORA") != "LORA":
            raise LoraError(f"adapter is of type {d.get('peft_type')!r}, only LORA is supported")
        unsupported = {k: v for k, v in d.items()
                       if k not in IMPLEMENTED and k not in NO_EFFECT and v not in (None, False, {}, [], "none")}
        if unsupported:
            raise LoraError(f"adapter uses PEFT options this port does not implement: {unsupported}")
        return cls(**{k: d[k] for k in IMPLEMENTED if k in d})


class LoraLinear(nn.Cell):
    """`base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`; the adapters are float32 whatever
    the base dtype (PEFT's default too), so half-precision training updates them in full precision."""

    def __init__(self, base_layer, r, scaling, lora_dropout=0.0, rng=None):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = scaling
        self.lora_A = Linear(base_layer.in_features, r, False, ms.float32)
        self.lora_B = Linear(r, base_layer.out_features, False, ms.float32)
        rng = rng or np.random.default_rng()
        # PEFT's init: A kaiming-uniform (a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B zero,
        # so the adapted model starts equal to the base model.
        bound = 1 / math.sqrt(base_layer.in_features)
        self.lora_A.weight.set_data(Tensor(rng.uniform(-bound, bound, (r, base_layer.in_features)).astype(np.float32)))
        self.lora_B.weight.set_data(Tensor(np.zeros((base_layer.out_features, r), np.float32)))
        self.lora_dropout = lora_dropout

    def construct(self, x):
        out = self.base_layer(x)
        h = x.astype(ms.float32)
        if self.lora_dropout > 0 and self.training:
            # ops.dropout draws from the global seed: a training loop that calls
            # mindspore.set_seed per step gets the same masks again when it resumes.
            h = ops.dropout(h, p=self.lora_dropout)
        return out + (self.lora_B(self.lora_A(h)) * self.scaling).astype(out.dtype)

    def merged_layer(self):
        """The base layer with `scaling * B @ A` added to its weight (computed in float32)."""
        weight = self.base_layer.weight
        delta = ops.matmul(self.lora_B.weight, self.lora_A.weight) * self.scaling
        weight.set_data((weight.astype(ms.float32) + delta).astype(weight.dtype))
        return self.base_layer


def _set_child(model, path, cell):
    parent_path, _, child = path.rpartition(".")
    parent = model
    for part in parent_path.split(".") if parent_path else []:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    if child.isdigit():
        parent[int(child)] = cell
    else:
        setattr(parent, child, cell)


def _name_parameters(model):
    # MindSpore names a parameter once, when its cell is first attached; wrapped layers keep their
    # short names ("q_proj.lora_A.weight" in every layer), and optimizers and checkpoints need
    # unique ones: give every parameter its path in the model.
    for path, param in model.parameters_and_names():
        param.name = path


def lora_layers(model):
    return [(name, cell) for name, cell in model.cells_and_names() if isinstance(cell, LoraLinear)]


def apply_lora(model, config, seed=0):
    """Wrap every Linear whose name `config` matches; freeze everything but the adapters.
    Returns the adapted names. Raises LoraError when nothing matches."""
    if lora_layers(model):
        raise LoraError("the model already has LoRA adapters: merge_lora() them or load a fresh model")
    targets = [(name, cell) for name, cell in model.cells_and_names() if name and config.matches(name)]
    not_linear = [name for name, cell in targets if not isinstance(cell, Linear)]
    if not_linear:
        raise LoraError(f"target_modules matched layers that are not Linear: {not_linear[:5]}")
    if not targets:
        raise LoraError(f"target_modules {config.target_modules!r} matched no layer of {type(model).__name__}")
    rng = np.random.default_rng(seed)
    for param in model.get_parameters():
        param.requires_grad = False
    for name, base in targets:
        _set_child(model, name, LoraLinear(base, config.r, config.scaling, config.lora_dropout, rng))
    _name_parameters(model)
    model.lora_config = config
    return [name for name, _ in targets]


def adapter_state(model):
    """{PEFT tensor name: float32 numpy} for every adapter weight."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.asnumpy()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.asnumpy()
    return state


def save_adapter(model, folder):
    """Write adapter_model.safetensors and adapter_config.json (PEFT's layout) into `folder`, each
    written whole or not at all (an interrupted save leaves no half-written file)."""
    if not lora_layers(model):
        raise LoraError("the model has no LoRA adapters to save")
    with written_atomically(os.path.join(folder, ADAPTER_WEIGHTS)) as temporary:
        save_file(adapter_state(model), temporary, metadata={"format": "pt"})
    with written_atomically(os.path.join(folder, ADAPTER_CONFIG)) as temporary, open(temporary, "w") as f:
        json.dump(model.lora_config.to_peft_dict(), f, indent=2)


def read_adapter_config(folder):
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise LoraError(f"{folder!r} is not a LoRA adapter folder: it has no {ADAPTER_CONFIG}")
    with open(path) as f:
        try:
            return LoraConfig.from_peft_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise LoraError(f"{path}: not valid JSON ({e})") from None


def load_adapter(model, folder):
    """Apply the adapter saved in `folder` (by us or by PEFT) to `model` and load its weights."""
    config = read_adapter_config(folder)
    adapter_tensor_names(folder)  # a clear error before the model is touched
    apply_lora(model, config)
    try:
        load_adapter_weights(model, folder)
    except LoraError:
        remove_lora(model)  # leave the model as it was
        raise
    return config


def adapter_tensor_names(folder):
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise LoraError(f"{folder!r} has no {ADAPTER_WEIGHTS}")
    return SafetensorsFile(path).keys()


def load_adapter_weights(model, folder):
    """Copy the adapter weights saved in `folder` into the model's existing LoRA layers, after
    checking that the names and shapes are exactly those of the model's adapters."""
    adapter_tensor_names(folder)  # a clear error when the file is missing
    weights = SafetensorsFile(os.path.join(folder, ADAPTER_WEIGHTS))
    # PEFT also writes names with the adapter name ("...lora_A.default.weight") in some versions.
    saved = {k.replace(".default.weight", ".weight"): k for k in weights.keys()}
    expected = {k: v.shape for k, v in adapter_state(model).items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    speech = [k for k in unexpected if k.startswith((PEFT_PREFIX + "talker.", PEFT_PREFIX + "token2wav."))]
    if speech and getattr(model, "has_talker", True) is False:
        raise LoraError(f"adapter {folder!r} also adapts the Talker ({len(speech)} tensors under talker.), and "
                        "this model was loaded with enable_audio_output=False: load it with "
                        "enable_audio_output=True to apply the whole adapter")
    wrong = [k for k in sorted(set(expected) & set(saved)) if weights.shape(saved[k]) != expected[k]]
    if missing or unexpected or wrong:
        raise LoraError(f"adapter {folder!r} does not fit the model: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}, wrong shape {wrong[:5]}")
    for name, layer in lora_layers(model):
        for part in ("lora_A", "lora_B"):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            getattr(layer, part).weight.set_data(Tensor(weights.get(saved[key]).astype(np.float32)))


def merge_lora(model):
    """Fold every adapter into its base weight and restore the plain Linear layers (PEFT's
    merge_and_unload). Returns the model."""
    return _unwrap(model, merge=True)


def remove_lora(model):
    """Drop the adapters and restore the plain Linear layers, weights untouched."""
    return _unwrap(model, merge=False)


def _unwrap(model, merge):
    for name, layer in lora_layers(model):
        _set_child(model, name, layer.merged_layer() if merge else layer.base_layer)
    _name_parameters(model)
    for param in model.get_parameters():
        param.requires_grad = True
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


class PeftModel:
    """PEFT's entry points as the existing MindSpore port's scripts call them:
    `PeftModel.from_pretrained(model.thinker, adapter_folder)`, then `merge_and_unload()` or
    `get_base_model()`. The adapter is applied to the model in place (see load_adapter)."""

    def __init__(self, model):
        self.__dict__["base_model"] = model

    @classmethod
    def from_pretrained(cls, model, model_id, adapter_name="default", is_trainable=False):
        load_adapter(model, model_id)
        if not is_trainable:
            for _, layer in lora_layers(model):
                for param in layer.trainable_params():
                    param.requires_grad = False
        return cls(model)

    def merge_and_unload(self):
        return merge_lora(self.base_model)

    def get_base_model(self):
        return self.base_model

    def __getattr__(self, name):
        return getattr(self.__dict__["base_model"], name)
