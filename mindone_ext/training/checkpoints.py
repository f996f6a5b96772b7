"""Training checkpoints that survive being killed at any moment.

`output_dir/checkpoint-<step>/` holds the adapter (PEFT layout), the optimizer's moments and
`trainer_state.json`. It is written as `checkpoint-<step>.partial` and renamed into place only
when complete, so a checkpoint folder either is whole or does not exist; `latest_checkpoint`
never returns a partial one; a save that fails or is interrupted removes it, and the next save
removes what a killed one left. A checkpoint damaged afterwards
(a file edited or truncated on disk) is passed over by `resume_latest` for the one before it.
"""
import json
import logging
import os
import re
import shutil

from ..nn.lora import load_adapter_weights, save_adapter
from ..utils.safetensors_io import SafetensorsFile, save_file

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def _checkpoints(output_dir):
    """[(step, path)] of complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT.fullmatch(name))]
    return sorted((s, p) for s, p in found if os.path.isfile(os.path.join(p, STATE_FILE)))


def latest_checkpoint(output_dir):
    found = _checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(output_dir, model, optimizer, state, save_total_limit=None):
    """Write checkpoint-<state["global_step"]> atomically; keep only the newest `save_total_limit`.
    `optimizer` may be None (a trainer that keeps its own optimizer state): the adapter and state only."""
    final = os.path.join(output_dir, f"checkpoint-{state['global_step']}")
    partial = final + ".partial"
    for leftover in [os.path.join(output_dir, n) for n in os.listdir(output_dir) if n.endswith(".partial")]:
        shutil.rmtree(leftover)
    os.makedirs(partial)
    try:
        save_adapter(model, partial)
        if optimizer is not None:
            tensors, meta = optimizer.state_dict()
            save_file(tensors, os.path.join(partial, OPTIMIZER_FILE), metadata=meta)
        with open(os.path.join(partial, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)
    except BaseException:  # a failed or interrupted save (Ctrl-C) leaves nothing behind
        shutil.rmtree(partial)
        raise
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(partial, final)
    if save_total_limit:
        for _, old in _checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old)
    return final


def load_checkpoint(path, model, optimizer):
    """Restore the adapter weights and optimizer moments saved in `path`; returns its state dict.
    The state and the moments are read and checked before anything is restored."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointDamaged(f"{path}: {STATE_FILE} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointDamaged(f"{path}: {STATE_FILE} has no global_step")
    try:
        moments = SafetensorsFile(os.path.join(path, OPTIMIZER_FILE))
        tensors = {k: moments.get(k) for k in moments.keys()}
        load_adapter_weights(model, path)
        optimizer.load_state_dict(tensors, moments.metadata)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointDamaged(f"{path}: {type(e).__name__}: {e}") from None
    return state


class CheckpointDamaged(ValueError):
    """A checkpoint folder whose files cannot be restored."""


def resume_latest(output_dir, model, optimizer):
    """(path, state) of the newest checkpoint that restores, passing over damaged ones (each
    logged); (None, None) when there is none."""
    for _, path in reversed(_checkpoints(output_dir)):
        try:
            return path, load_checkpoint(path, model, optimizer)
        except CheckpointDamaged as e:
            logging.getLogger(__name__).warning("skipping a damaged checkpoint: %s", e)
    return None, None
