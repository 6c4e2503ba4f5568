"""Checkpoints for --resume, written atomically and without pickle.

Accelerate's `save_state` and `torch.save` store optimizer state with pickle, and loading a pickle runs
whatever code it names. A checkpoint folder may be copied between machines, so we keep tensors in
safetensors and everything else in JSON:

  step-000120/
    trainable.safetensors   parameters with requires_grad (adapter + head, or the whole model)
    optimizer.safetensors   AdamW moments, keyed "<param index>.<name>"
    optimizer.json          param_groups and any non-tensor state
    rng.safetensors         torch CPU (and CUDA) RNG states: a resumed run draws the same dropout masks
    state.json              step, epoch, batches done in the epoch, scheduler state, counters

The folder is written under a temporary name and renamed into place (runtime/atomic.py): a crash mid-write
leaves a temp folder that is ignored and cleaned, never a checkpoint that looks complete but is not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.runtime.atomic import atomic_dir

PREFIX = "step-"


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for idx, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.contiguous()
            else:
                rest["state"].setdefault(str(idx), {})[key] = value
    return tensors, rest


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in rest["state"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(ckpt_root: Path, model: nn.Module, optimizer, scheduler, train_state: dict, keep: int) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{train_state['step']:06d}"
    with atomic_dir(final) as tmp:
        save_file(_trainable(model), tmp / "trainable.safetensors")
        opt_tensors, opt_rest = _split_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_rest))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        state = dict(train_state, scheduler=scheduler.state_dict())
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; return the train state."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"{path}: checkpoint has parameters this model lacks, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    rest = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_join_optimizer_state(load_file(path / "optimizer.safetensors"), rest))
    state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    return state
