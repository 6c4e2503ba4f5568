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
    checksums.json          sha256 of each file above; written last

The folder is written under a temporary name, flushed to disk and renamed into place (runtime/atomic.py): a
crash or a power loss mid-write leaves a temp folder that is ignored and cleaned, never a checkpoint that
looks complete but is not. Older checkpoints are pruned only once the new one is on disk, so there is always
one to go back to.

Resuming verifies every file against checksums.json before anything is loaded. A damaged latest checkpoint
(a disk that lost data, a copy cut short) is skipped with a one-line warning and the one before it is used;
a checkpoint that lacks one of the model's trainable parameters is refused: loading it would silently keep
that parameter's fresh initialisation.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import TunelabError
from tunelab.runtime.atomic import atomic_dir, remove_temporaries
from tunelab.runtime.run_dir import sha256

PREFIX = "step-"
CHECKSUMS = "checksums.json"


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
    """Write the checkpoint of `train_state['step']`, durably, then prune to the `keep` newest."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(ckpt_root)  # a save killed midway left its temporary folder (under another step's name)
    step = train_state["step"]
    final = ckpt_root / f"{PREFIX}{step:06d}"
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
        checksums = {f.name: sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=1))
    # Only now, with the new checkpoint on disk: the older ones beyond `keep`, and any later than this step
    # (left by a run that went further before it resumed from an earlier, intact checkpoint).
    kept = [p for p in list_checkpoints(ckpt_root) if _step(p) <= step][-keep:]
    for old in list_checkpoints(ckpt_root):
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _step(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Every checkpoint folder, oldest first, intact or not (see verify_checkpoint)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=_step)


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with a checkpoint folder, in a few words, or None when every file matches its sha256."""
    try:
        checksums = json.loads((path / CHECKSUMS).read_text())
    except FileNotFoundError:
        # Written before checksums were recorded: the files must at least all be there and readable.
        if not (path / "state.json").is_file():
            return "state.json is missing"
        checksums = None
    except (OSError, ValueError):
        return f"{CHECKSUMS} is unreadable"
    if checksums is None:
        for name in ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors"):
            if not (path / name).is_file():
                return f"{name} is missing"
        return None
    if not isinstance(checksums, dict) or "state.json" not in checksums:
        return f"{CHECKSUMS} is incomplete"
    for name, digest in checksums.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256(f) != digest:
            return f"{name} does not match its sha256"
    return None


def resume_checkpoint(ckpt_root: Path, model: nn.Module, optimizer, scheduler,
                      warn: Callable[[str], None]) -> tuple[dict, Path] | None:
    """Load the newest intact checkpoint into model, optimizer and scheduler; (train state, its folder), or None
    when there is no checkpoint at all. Damaged ones are skipped, named in one warning line; if every one is
    damaged, resuming stops with one line (training from step 0 on would not be what was asked)."""
    damaged = []
    for path in reversed(list_checkpoints(ckpt_root)):
        problem = verify_checkpoint(path)
        if problem:
            damaged.append(f"{path.name} ({problem})")
            continue
        if damaged:
            warn(f"checkpoint {', '.join(damaged)} is damaged; resuming from the one before: {path.name}")
        return load_checkpoint(path, model, optimizer, scheduler), path
    if damaged:
        raise TunelabError(f"{ckpt_root}: no intact checkpoint to resume from ({', '.join(damaged)}); remove "
                           f"{ckpt_root} to train again from step 0")
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; return the train state.

    Every trainable parameter must be in the checkpoint, with its shape: one that is not would keep its fresh
    initialisation while the rest resumed, a run that never happened."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    unknown = [n for n in weights if n not in params]
    if unknown:
        raise TunelabError(f"{path}: the checkpoint holds {len(unknown)} parameter(s) this model lacks, e.g. "
                           f"{unknown[0]}: it was written for another model or technique")
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise TunelabError(f"{path}: the checkpoint lacks {len(missing)} trainable parameter(s), e.g. {missing[0]}: "
                           "it was written for another model or technique, and resuming would keep their fresh "
                           "initialisation")
    wrong = [n for n, v in weights.items() if v.shape != params[n].shape]
    if wrong:
        raise TunelabError(f"{path}: parameter {wrong[0]} has shape {tuple(weights[wrong[0]].shape)} in the "
                           f"checkpoint and {tuple(params[wrong[0]].shape)} in this model")
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
