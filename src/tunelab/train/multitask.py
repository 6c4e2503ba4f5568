"""Multi-task training: several classification tasks on one base model, one head per task, one loop.

What the tasks share (`sharing`):

- shared_adapter:   one adapter trained on every task's steps; each head sees only its own task's batches.
- adapter_per_task: only the frozen base; each task has its own PEFT named adapter on the one copy of the base
                    in memory, switched to before its step, and its own optimizer and schedule, so a step of
                    one task leaves every other task's adapter and head bitwise as they were.

Each optimizer step trains one task, drawn by the sampling strategy:

- proportional:  p_i = n_i / sum_j n_j          (big tasks dominate; small ones may be starved)
- temperature:   p_i = n_i^(1/T) / sum_j n_j^(1/T)  (T=1 is proportional, large T tends to uniform)
- round_robin:   each task in turn               (uniform whatever the sizes)

and its loss is multiplied by the task's `loss_weight`. The budget (train.max_steps) is counted over all tasks, so
comparing against single-task runs of max_steps / k steps each compares the same number of examples seen.

The output folder holds one complete run directory per task under tasks/ (the shared adapter or the task's own,
and that task's head): `tunelab eval`, `predict`, `serve` and `export` take it like any run, and
`tunelab route build` routes between them.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import MultiTaskConfig, RunConfig, dump_config
from tunelab.errors import TunelabError
from tunelab.runtime.atomic import atomic_dir, atomic_write_json
from tunelab.runtime.run_dir import RunDir, sha256


def task_probabilities(sizes: dict[str, int], strategy: str, temperature: float) -> dict[str, float]:
    if strategy == "round_robin":
        return {name: 1 / len(sizes) for name in sizes}
    power = 1.0 if strategy == "proportional" else 1.0 / temperature
    mass = {name: n ** power for name, n in sizes.items()}
    total = sum(mass.values())
    return {name: m / total for name, m in mass.items()}


def task_schedule(sizes: dict[str, int], strategy: str, temperature: float, steps: int, seed: int) -> list[str]:
    """The task of every step, fixed up front (seeded) so a run is reproducible and its mix is known."""
    names = list(sizes)
    if strategy == "round_robin":
        return [names[i % len(names)] for i in range(steps)]
    probs = task_probabilities(sizes, strategy, temperature)
    return random.Random(seed).choices(names, weights=[probs[n] for n in names], k=steps)


class _Batches:
    """Endless seeded batches over one task's features: a new shuffle each pass."""

    def __init__(self, features: list[dict], batch_size: int, seed: int):
        self.features, self.batch_size, self.seed, self.epoch, self.queue = features, batch_size, seed, 0, []

    def next(self) -> list[dict]:
        from tunelab.data.batching import batch_plan

        if not self.queue:
            self.queue = batch_plan([len(f["input_ids"]) for f in self.features], self.batch_size, self.seed,
                                    self.epoch, group_by_length=False)
            self.epoch += 1
        return [self.features[i] for i in self.queue.pop(0)]


@dataclass
class _TaskTrainer:
    """What one task's steps run through and may change."""

    name: str
    model: Any  # the task's model: the shared backbone and the task's own head
    params: list  # what its steps may change (gradient clipping covers exactly these)
    optimizer: Any
    scheduler: Any
    adapter: str | None  # its named adapter on the backbone (adapter_per_task); None = the one shared adapter


def _new_parameters(module, known: set[int]) -> list:
    """The parameters of `module` not in `known` (by identity), which then joins `known`: what the last
    apply()/add_adapter() added, whatever the technique names its tensors."""
    fresh = [p for p in module.parameters() if id(p) not in known]
    known.update(id(p) for p in fresh)
    return fresh


def _train_step(method, backbone, task: _TaskTrainer, batch: dict, weight: float, max_grad_norm: float | None) -> float:
    """One optimizer step on one task's batch; returns its (unweighted) mean loss."""
    import torch

    if task.adapter is not None:
        method.set_adapter(backbone, task.adapter)
    out = task.model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    (weight * out.loss_sum / out.count).backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(task.params, max_grad_norm)
    task.optimizer.step()
    task.scheduler.step()
    task.optimizer.zero_grad(set_to_none=True)
    return float((out.loss_sum / out.count).detach())


def train_multitask(mcfg: MultiTaskConfig, console=None) -> RunDir:
    import torch
    from safetensors.torch import save_file

    from tunelab.data.batching import collate
    from tunelab.data.examples import load_splits
    from tunelab.data.tokenize import tokenize_classification
    from tunelab.evaluate.runner import evaluate_classification
    from tunelab.methods import count_parameters, get_method
    from tunelab.models.loading import load_task_model
    from tunelab.runtime.hardware import describe, resolve_precision, usable_cores
    from tunelab.train.optim import build_optimizer, build_scheduler

    say = console.print if console is not None else (lambda *a, **k: None)
    torch.set_num_threads(usable_cores())
    seed = mcfg.train.seed
    precision = resolve_precision(mcfg.train.precision)
    if precision != "fp32":
        raise TunelabError(f"train.precision: multi-task runs train in fp32 only for now (resolved {precision})")
    output = Path(mcfg.output.dir) / (mcfg.output.name or "multitask")
    if RunDir(output).metrics_path.exists():
        raise TunelabError(f"{output} already holds a finished multi-task run; pick another output.name")
    task_cfgs: dict[str, RunConfig] = {t.name: mcfg.task_config(t) for t in mcfg.tasks}
    weights = {t.name: t.loss_weight for t in mcfg.tasks}
    splits = {name: load_splits(cfg.data, "classification", seed) for name, cfg in task_cfgs.items()}
    baselines = {name: _baseline(path, task_cfgs[name]) for name, path in mcfg.baselines.items()}  # before training

    torch.manual_seed(seed)
    method = get_method(mcfg.method.name)
    per_task = mcfg.sharing == "adapter_per_task"
    names = list(task_cfgs)
    model, tokenizer, _ = load_task_model(mcfg.model, "classification", num_labels=len(splits[names[0]].labels))
    known = {id(p) for p in model.backbone.parameters()}  # the base's weights
    backbone = method.apply(model.backbone, mcfg.method, "classification")
    model.backbone = backbone
    models = {names[0]: model}
    # adapter_per_task: the first task keeps the adapter apply() made ("default"), each other task gets one of its
    # own, named by position (task names may hold dots, which PEFT's module dicts refuse).
    adapters = {names[0]: "default"} if per_task else {}
    own_adapter = {names[0]: _new_parameters(backbone, known)}
    for i, name in enumerate(names[1:], 1):
        models[name], _, _ = load_task_model(mcfg.model, "classification", num_labels=len(splits[name].labels),
                                             backbone=backbone)
        if per_task:
            adapters[name] = f"task{i}"
            method.add_adapter(backbone, mcfg.method, "classification", adapters[name])
            own_adapter[name] = _new_parameters(backbone, known)
    features = {name: tokenize_classification(s.train, tokenizer, task_cfgs[name].data.max_length, s.labels,
                                              task_cfgs[name].data.truncation) for name, s in splits.items()}
    sizes = {name: len(f) for name, f in features.items()}
    steps = mcfg.train.max_steps
    schedule = task_schedule(sizes, mcfg.sampling.strategy, mcfg.sampling.temperature, steps, seed)
    probs = task_probabilities(sizes, mcfg.sampling.strategy, mcfg.sampling.temperature)
    say(f"tasks {', '.join(f'{n} {sizes[n]} rows, p={probs[n]:.2f}' for n in sizes)} ({mcfg.sampling.strategy}, "
        f"{mcfg.sharing})")

    everything = torch.nn.ModuleList(models.values())  # shared backbone counted once
    lr = mcfg.train.lr or method.learning_rate(mcfg.method)
    cpu, train = torch.device("cpu"), mcfg.train
    if per_task:
        # One optimizer and one schedule per task, over that task's adapter and head only. A single AdamW over
        # every task would still move an adapter on steps of other tasks whenever its gradient is a zero tensor
        # rather than None (decoupled weight decay, and the momentum of its earlier steps), and its schedule
        # would follow the global step: here each task trains as its own run would, over its own steps.
        trainers = {}
        for name in names:
            params = own_adapter[name] + list(models[name].head.parameters())
            method.set_adapter(backbone, adapters[name])  # makes that adapter trainable
            optimizer = build_optimizer(torch.nn.ParameterList(params), lr, train.weight_decay, train.optimizer, cpu)
            scheduler = build_scheduler(optimizer, train.scheduler, max(1, schedule.count(name)), train.warmup_ratio)
            trainers[name] = _TaskTrainer(name, models[name], params, optimizer, scheduler, adapters[name])
    else:
        optimizer = build_optimizer(everything, lr, train.weight_decay, train.optimizer, cpu)
        scheduler = build_scheduler(optimizer, train.scheduler, steps, train.warmup_ratio)
        params = list(everything.parameters())
        trainers = {name: _TaskTrainer(name, models[name], params, optimizer, scheduler, None) for name in names}
    # Trainable = what the optimizers update (with adapter_per_task, requires_grad follows the active adapter).
    updated = {id(p): p for t in trainers.values() for g in t.optimizer.param_groups for p in g["params"]}
    trainable, total = sum(p.numel() for p in updated.values()), count_parameters(everything)[1]
    batches = {name: _Batches(f, mcfg.train.batch_size, seed) for name, f in features.items()}
    pad = tokenizer.pad_token_id
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(output) as tmp:
        folder = RunDir(tmp)
        everything.train()
        start, log_loss = time.perf_counter(), {n: [] for n in models}
        for step, name in enumerate(schedule, 1):
            task = trainers[name]
            loss = _train_step(method, backbone, task, collate(batches[name].next(), pad), weights[name],
                               train.max_grad_norm)
            log_loss[name].append(loss)
            if step % mcfg.train.log_every == 0 or step == steps:
                folder.log({"step": step, "task": name, "loss": loss, "lr": task.scheduler.get_last_lr()[0]})
                recent = ", ".join(f"{n} {sum(v[-10:]) / len(v[-10:]):.3f}" for n, v in log_loss.items() if v)
                say(f"step {step}/{steps}  loss by task: {recent}")
        wall = time.perf_counter() - start
        everything.eval()

        recipe = {"kind": "multitask", "sharing": mcfg.sharing, "sampling": mcfg.sampling.model_dump(),
                  "steps": steps, "loss_weights": weights, "probabilities": probs, "train_rows": sizes,
                  "steps_per_task": {n: schedule.count(n) for n in models}}
        table = {}
        for name, cfg in task_cfgs.items():
            if per_task:
                method.set_adapter(backbone, adapters[name])
            test = tokenize_classification(splits[name].test, tokenizer, cfg.data.max_length, splits[name].labels,
                                           cfg.data.truncation)
            metrics = evaluate_classification(models[name], test, splits[name].labels, mcfg.eval.batch_size, pad,
                                              precision, torch.device("cpu")) if test else {}
            row = {"accuracy": metrics.get("accuracy"), "f1_macro": metrics.get("f1_macro"),
                   "num_examples": metrics.get("num_examples", 0), "steps": schedule.count(name)}
            row.update(baselines.get(name, {}))
            table[name] = row
            say(f"eval  {name}: accuracy {row['accuracy']:.4f}"
                + (f" vs single-task {row['single_task_accuracy']:.4f}" if "single_task_accuracy" in row else ""))
            run = RunDir.create(folder.task_dir(name), dump_config(cfg), seed=seed,
                                data_files={"train": cfg.data.train, "test": cfg.data.test}, hardware=describe())
            run.update_manifest(multitask=recipe)
            files = run.model_files
            files.root.mkdir(parents=True)
            if per_task:  # only this task's adapter, written as the default adapter any run's loading expects
                method.save_adapter(backbone, files.backbone, adapters[name])
            else:
                method.save(backbone, files.backbone)
            save_file({k: v.contiguous() for k, v in models[name].head.state_dict().items()}, str(files.head))
            tokenizer.save_pretrained(files.tokenizer)
            run.write_labels(splits[name].labels)
            run.finish({"eval": metrics, "multitask": recipe})
        summary = {"steps": steps, "wall_s": round(wall, 2), "lr": lr, "trainable_params": trainable,
                   "total_params": total, "precision": precision}
        atomic_write_json(folder.recipe_path, {**recipe, "tasks": list(models), "base": mcfg.model.name,
                                               "method": mcfg.method.name})
        atomic_write_json(folder.metrics_path, {"recipe": recipe, "train": summary, "tasks": table})
    return RunDir(output)


def _baseline(path: str, cfg: RunConfig) -> dict:
    """The single-task run's test accuracy and its step count, read from its metrics.json."""
    import json

    run = RunDir(path)
    if not run.is_complete():
        raise TunelabError(f"baselines: {path} is not a finished run (no metrics.json)")
    metrics = json.loads(run.metrics_path.read_text())
    # Same test data, whatever the path: the run's manifest records the sha256 of the file it was tested on.
    tested = run.manifest().get("data", {}).get("test", {})
    if cfg.data.test and Path(cfg.data.test).is_file() and tested.get("sha256") != sha256(cfg.data.test):
        raise TunelabError(f"baselines: {path} was tested on {tested.get('path')}, whose contents differ from this "
                           f"task's {cfg.data.test}: the comparison would not be on the same test set")
    return {"single_task_accuracy": metrics["eval"]["accuracy"], "single_task_steps": metrics["train"]["steps"],
            "single_task_run": path}
