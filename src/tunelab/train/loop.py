"""The training recipe: setup -> train -> save -> evaluate, in one readable loop on Accelerate.

No Trainer subclass: every step is visible here. Accelerate supplies the device placement, mixed
precision and the distributed wrappers, so the same loop runs on one CPU core or under `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file
from torch.profiler import record_function

from tunelab.config import RunConfig
from tunelab.data.examples import Splits
from tunelab.data.pipeline import Features, tokenize_splits
from tunelab.data.batching import batch_plan, collate
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.evaluate.runner import evaluate_classification, evaluate_lm, generate, instruction_prompts
from tunelab.methods import count_parameters, get_method
from tunelab.models.loading import load_task_model
from tunelab.models.task_models import IGNORE_INDEX
from tunelab.plan import estimate
from tunelab.results import TrainMetrics
from tunelab.runtime.atomic import atomic_dir
from tunelab.runtime.distributed import accelerator_cpu_flag, join_processes, launched_with, threads_per_process
from tunelab.runtime.hardware import configure_cpu_heap, describe, peak_memory_bytes, resolve_precision
from tunelab.runtime.run_dir import ModelFiles, RunDir
from tunelab.train.checkpoint import resume_checkpoint, save_checkpoint
from tunelab.train.flops import mfu, peak_flops
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.progress import TrainProgress

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class FineTune:
    def __init__(self, cfg: RunConfig, splits: Splits, run: RunDir, console: Console | None = None, on_eval=None):
        """on_eval(step, metrics) is called after each periodic validation; it may raise to stop the run
        (the sweep's pruner does)."""
        self.cfg = cfg
        self.on_eval = on_eval
        self.on_step = None  # on_step(step) after each optimizer step (tunelab profile advances its schedule)
        self.splits = splits
        self.run = run
        self.console = console or Console(stderr=True)
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_wall_s": 0.0, "real_tokens": 0}

    # ------------------------------------------------------------------ setup

    def setup(self, resume: bool = False) -> None:
        cfg = self.cfg
        torch.set_num_threads(threads_per_process())
        set_seed(cfg.train.seed)
        self.precision = resolve_precision(cfg.train.precision)
        # Parts of a backbone the task never uses (BERT's pooler under mean pooling) get no gradient; DDP must
        # be told, or it stops at step 2 waiting for them. The cost is one walk of the autograd graph per step.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        join_processes()
        self.accelerator = Accelerator(
            mixed_precision=MIXED_PRECISION[self.precision], cpu=accelerator_cpu_flag(), kwargs_handlers=[ddp]
        )
        self.device = self.accelerator.device
        # Before the model loads: its weights and every step's activations come from the heap set up here.
        self.cpu_heap = configure_cpu_heap(cfg.train.cpu_heap) if self.device.type == "cpu" else None
        kind = self.accelerator.distributed_type
        if launched_with("FSDP") and kind != DistributedType.FSDP:
            self.console.print(f"[yellow]FSDP was asked for, but Accelerate shards only on GPUs: this run is {kind.value} "
                               "(plain data parallel: every process holds the whole model)[/]")
        # FSDP and DeepSpeed hold weights or optimizer state in shards; checkpoint.py saves whole ones.
        if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED) and cfg.train.save_every:
            raise ConfigError(
                f"train.save_every: resumable checkpoints are written for one process or DDP, not under "
                f"{kind.value}; set train.save_every=null or launch with DDP"
            )
        # DeepSpeed divides each micro-batch loss by its gradient_accumulation_steps; undo that, the loss is
        # already normalised by the whole step's count (see train()).
        self.loss_multiplier = cfg.train.grad_accum if kind == DistributedType.DEEPSPEED else 1
        if kind == DistributedType.DEEPSPEED:
            self._configure_deepspeed()

        self.method = get_method(cfg.method.name)
        # FSDP and ZeRO-3 leave each process a shard of every weight: saving must gather them (see save()).
        self.gather_on_save = kind == DistributedType.FSDP or (
            kind == DistributedType.DEEPSPEED and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        if self.gather_on_save:
            self.method.check_sharded_save(cfg.method)
        model, self.tokenizer, _ = load_task_model(
            cfg.model, cfg.task, num_labels=len(self.splits.labels),
            pretrained_kwargs=self.method.pretrained_kwargs(cfg.method, self.precision),
        )
        model.backbone = self.method.apply(model.backbone, cfg.method, cfg.task)
        self.trainable_params, self.total_params = count_parameters(model)
        if cfg.train.compile:
            # In place (not a wrapper): parameter names, and so saving and checkpoints, stay as they were.
            # dynamic=None: compile for the first shape, then once more with symbolic lengths when they vary.
            model.backbone.compile()

        self.features: Features = tokenize_splits(self.splits, cfg, self.tokenizer)
        for note in self.features.notes:
            self.console.print(f"[dim]data  {note}[/]")
        if not self.features.train:
            raise DataError(
                f"{cfg.data.train}: no training example fits in data.max_length={cfg.data.max_length} "
                "(every prompt alone fills it); raise data.max_length"
            )
        self.lengths = [len(f["input_ids"]) for f in self.features.train]
        if len(self.lengths) < self.accelerator.num_processes:
            raise DataError(f"{cfg.data.train}: {len(self.lengths)} training rows for {self.accelerator.num_processes} processes")

        # The preflight estimate, recorded beside the measured peak so every run shows how far to trust it.
        self.plan = estimate(cfg, device=self.device, precision=self.precision, tokenizer=self.tokenizer,
                             features=self.features, num_labels=max(len(self.splits.labels), 2))

        self.lr = cfg.train.lr or self.method.learning_rate(cfg.method)
        optimizer = build_optimizer(model, self.lr, cfg.train.weight_decay, cfg.train.optimizer, self.device)
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(optimizer, cfg.train.scheduler, self.total_steps, cfg.train.warmup_ratio)
        # FSDP shards each transformer block as its own unit, found through _no_split_modules; the task wrapper
        # has none of its own, so it lends the backbone's (else FSDP makes one unit of the whole model).
        model._no_split_modules = getattr(model.backbone, "_no_split_modules", None)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

        if resume:
            warn = lambda line: self.console.print(f"[yellow]warning: {line}[/]", highlight=False, soft_wrap=True)  # noqa: E731
            found = resume_checkpoint(self.run.checkpoint_dir, self._unwrapped(), self.optimizer, self.scheduler, warn)
            if found:
                self.state, path = found
                saved_world = self.state.get("num_processes", 1)
                if saved_world != self.accelerator.num_processes:
                    # The batch plan depends on the process count: another count would replay other examples.
                    raise TunelabError(
                        f"--resume: {path} was written by {saved_world} process(es); "
                        f"launch it with {saved_world}, not {self.accelerator.num_processes}"
                    )
                self.console.print(f"[bold]resumed[/] from {path} (step {self.state['step']})")
            else:
                self.console.print(f"[yellow]no checkpoint in {self.run.checkpoint_dir}; starting from step 0[/]")
        self.state["num_processes"] = self.accelerator.num_processes
        if self.accelerator.is_main_process:
            self.run.update_manifest(
                precision=self.precision,
                lr=self.lr,
                trainable_params=self.trainable_params,
                total_params=self.total_params,
                hardware=describe(),
                num_processes=self.accelerator.num_processes,
                distributed_type=self.accelerator.distributed_type.value,
                attention=getattr(self._unwrapped().backbone.config, "_attn_implementation", None),
            )
        self.console.print(
            f"model {cfg.model.name} ({cfg.task}), method {cfg.method.name}: "
            f"{self.trainable_params:,} of {self.total_params:,} parameters trainable "
            f"({100 * self.trainable_params / self.total_params:.2f}%), precision {self.precision}, lr {self.lr:g}, "
            f"{self.total_steps} steps, estimated peak memory {self.plan.peak_memory_bytes / 1024**3:.2f} GiB "
            f"({'process RSS' if self.device.type == 'cpu' else 'allocated tensors'})"
        )

    def _configure_deepspeed(self) -> None:
        """DeepSpeed sizes its buffers and runs accumulation and clipping itself, from its own config: fill it
        from train.* (with no DataLoader to read the batch size from, prepare() would refuse to start)."""
        t, world = self.cfg.train, self.accelerator.num_processes
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = t.batch_size
        ds["gradient_accumulation_steps"] = t.grad_accum
        ds["train_batch_size"] = t.batch_size * t.grad_accum * world
        ds["gradient_clipping"] = t.max_grad_norm or 0.0
        if ds.get("zero_optimization", {}).get("stage") == 3:
            # Without it get_state_dict cannot gather the ZeRO-3 shards into whole weights at save time.
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _micro_batches_per_epoch(self) -> int:
        """Global batches in an epoch's plan (see _micro_batches): full ones, plus a last one if every process
        gets an example of it."""
        world = self.accelerator.num_processes
        full, rest = divmod(len(self.lengths), self.cfg.train.batch_size * world)
        return max(1, full + (rest >= world))

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        return max(1, math.ceil(t.epochs * self._micro_batches_per_epoch() / t.grad_accum))

    # ------------------------------------------------------------------ data

    def _micro_batches(self):
        """Yield (epoch, index in epoch, batch) from the saved position onwards, forever.

        The seeded plan is one of global batches, batch_size x num_processes examples each, and process r
        takes the r-th slice of each. So N processes at batch_size B see, step by step, exactly the examples
        one process sees at batch_size N x B (length grouping and the short last batch included), and the
        loss normalisation in train() makes their gradients equal too. A last batch smaller than the process
        count is dropped: every process must run every step.
        """
        t = self.cfg.train
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        epoch, start = self.state["epoch"], self.state["batch_in_epoch"]
        while True:
            plan = batch_plan(self.lengths, t.batch_size * world, t.seed, epoch, t.group_by_length)
            plan = [b[rank * len(b) // world : (rank + 1) * len(b) // world] for b in plan if len(b) >= world]
            for i in range(start, len(plan)):
                batch = collate([self.features.train[j] for j in plan[i]], self.tokenizer.pad_token_id)
                yield epoch, i, {k: self._to_device(v) for k, v in batch.items()}
            epoch, start = epoch + 1, 0

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """On CUDA, copy from pinned memory without blocking, so the copy overlaps the previous step's kernels.
        (Collating a batch from pre-tokenized lists takes well under a millisecond: no DataLoader workers.)"""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _loss_count(self, batch: dict) -> torch.Tensor:
        """What a micro-batch's loss is summed over: examples for classification, target tokens for LM."""
        if self.cfg.task == "classification":
            return torch.tensor(batch["labels"].numel(), device=self.device)
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        t, acc = self.cfg.train, self.accelerator
        params = [p for p in self.model.parameters() if p.requires_grad]
        micro = self._micro_batches()
        window = {"loss_sum": 0.0, "count": 0, "tokens": 0, "start": time.perf_counter()}
        self.model.train()
        progress = TrainProgress(self.console, self.total_steps, self.state["step"], enabled=acc.is_main_process)
        segment_start = time.perf_counter()
        with progress:
            while self.state["step"] < self.total_steps:
                group = [next(micro) for _ in range(t.grad_accum)]
                counts = [self._loss_count(b) for _, _, b in group]
                # The step's loss is sum(loss) / (targets across all micro-batches and all ranks). DDP averages
                # gradients over ranks, so multiplying by world size leaves exactly sum / global count.
                global_count = acc.reduce(torch.stack(counts).sum(), reduction="sum")
                scale = acc.num_processes / global_count.clamp(min=1)
                step_loss_sum, step_tokens = 0.0, 0
                for i, (_, _, batch) in enumerate(group):
                    sync = i == len(group) - 1
                    acc.sync_gradients = sync  # DeepSpeed reduces and steps only when this is set
                    with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                        # record_function: named phases in `tunelab profile` (a no-op when no profiler runs)
                        with record_function("tunelab.forward"):
                            out = self.model(**batch)
                        with record_function("tunelab.backward"):
                            acc.backward(out.loss_sum * scale * self.loss_multiplier)
                    step_loss_sum += float(out.loss_sum.detach())
                    step_tokens += int(batch["attention_mask"].sum())
                # Each process saw only its slice: sum the slices, so loss and tokens/s describe the whole step.
                step_loss_sum, step_tokens = acc.reduce(
                    torch.tensor([step_loss_sum, step_tokens], dtype=torch.float64, device=self.device), reduction="sum"
                ).tolist()
                window["loss_sum"] += step_loss_sum
                window["count"] += int(global_count)
                window["tokens"] += int(step_tokens)
                self.state["real_tokens"] += int(step_tokens)
                with record_function("tunelab.optimizer"):
                    grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm else None
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)

                epoch, index, _ = group[-1]
                self.state.update(step=self.state["step"] + 1, epoch=epoch, batch_in_epoch=index + 1)
                step = self.state["step"]
                loss = window["loss_sum"] / max(window["count"], 1)
                elapsed = time.perf_counter() - window["start"]
                progress.update(step, loss, self.scheduler.get_last_lr()[0], window["tokens"] / max(elapsed, 1e-9))
                if self.on_step is not None:
                    self.on_step(step)
                if step % t.log_every == 0 or step == self.total_steps:
                    self._log_window(window, grad_norm)
                    window = {"loss_sum": 0.0, "count": 0, "tokens": 0, "start": time.perf_counter()}
                if t.eval_every and step % t.eval_every == 0 and self.features.validation:
                    paused = time.perf_counter()
                    self._log_eval(progress)
                    self.model.train()
                    # Validation time is not training time: keep it out of wall_s and tokens/s.
                    paused = time.perf_counter() - paused
                    segment_start += paused
                    window["start"] += paused
                if t.save_every and step % t.save_every == 0 and step < self.total_steps:
                    self._save_checkpoint(segment_start)
                    segment_start = time.perf_counter()
        self.state["train_wall_s"] += time.perf_counter() - segment_start

    def _log_window(self, window: dict, grad_norm) -> None:
        elapsed = time.perf_counter() - window["start"]
        record = {
            "step": self.state["step"],
            "epoch": round(self.state["epoch"] + self.state["batch_in_epoch"] / self._micro_batches_per_epoch(), 4),
            "loss": window["loss_sum"] / max(window["count"], 1),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "real_tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
            "peak_memory_bytes": peak_memory_bytes(self.device),
        }
        if self.accelerator.is_main_process:
            self.run.log(record)

    def _log_eval(self, progress) -> None:
        metrics = self.evaluate(self.features.validation)
        if self.accelerator.is_main_process:
            self.run.log({"step": self.state["step"], "split": "validation", **_flat(metrics)})
        progress.note(f"step {self.state['step']} validation " + _headline(metrics))
        if self.on_eval is not None:
            self.on_eval(self.state["step"], metrics)

    def _save_checkpoint(self, segment_start: float) -> None:
        self.state["train_wall_s"] += time.perf_counter() - segment_start
        if self.accelerator.is_main_process:
            save_checkpoint(
                self.run.checkpoint_dir, self._unwrapped(), self.optimizer, self.scheduler, self.state,
                self.cfg.train.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ save

    def save(self) -> None:
        """Write the trained artifact to run/model, through a temp folder renamed into place.

        Under FSDP or ZeRO-3 each process holds a shard of every weight: get_state_dict gathers the whole
        weights (every process must take part) and the main process writes them. Saving the sharded module
        as it is writes empty or truncated adapter files without an error (trl#4416, peft#2892), so what was
        written is checked before the run may complete.
        """
        acc = self.accelerator
        state = acc.get_state_dict(self.model) if self.gather_on_save else None
        if acc.is_main_process:
            model = self._unwrapped()
            with atomic_dir(self.run.model_dir) as tmp:
                files = ModelFiles(tmp)
                if state is None:
                    self.method.save(model.backbone, files.backbone)
                    head = model.head.state_dict() if hasattr(model, "head") else {}
                else:
                    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
                    self.method.save(model.backbone, files.backbone, state_dict=backbone)
                    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
                if hasattr(model, "head"):
                    save_file({k: v.contiguous() for k, v in head.items()}, files.head)
                    self.run.write_labels(self.splits.labels)
                _check_weight_files(tmp)
                self.tokenizer.save_pretrained(files.tokenizer)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ evaluate

    def evaluate(self, features: list[dict]) -> dict:
        """Every process evaluates the whole set; the main one records it. Under FSDP2 and ZeRO-3 each
        forward gathers the sharded weights, so all processes must take part; under DDP the others would
        only wait. (Sharding the set across processes would be N times faster; not needed yet.)"""
        e = self.cfg.eval
        model = self._unwrapped()
        pad = self.tokenizer.pad_token_id
        if self.cfg.task == "classification":
            return evaluate_classification(model, features, self.splits.labels, e.batch_size, pad, self.precision, self.device)
        return evaluate_lm(model, features, e.batch_size, pad, self.precision, self.device)

    def samples(self) -> list[dict]:
        n = self.cfg.eval.num_samples
        if self.cfg.task != "instruction" or not n or not self.splits.test:
            return []
        examples = self.splits.test[:n]
        prompts = instruction_prompts(examples, self.tokenizer, self.features.template)
        out = generate(self._unwrapped(), self.tokenizer, prompts, self.cfg.eval.max_new_tokens, self.device,
                       self.precision, add_special_tokens=self.features.template != "chat",
                       repetition_penalty=self.cfg.eval.repetition_penalty)
        for sample, ex in zip(out, examples):
            sample["reference"] = ex.get("output") or ex.get("messages", [{}])[-1].get("content")
        return out

    def train_metrics(self) -> TrainMetrics:
        wall = self.state["train_wall_s"]
        return TrainMetrics(
            steps=self.state["step"],
            wall_s=round(wall, 2),
            real_tokens=self.state["real_tokens"],
            real_tokens_per_s=self.state["real_tokens"] / wall if wall else None,
            peak_memory_bytes=peak_memory_bytes(self.device),
            trainable_params=self.trainable_params,
            total_params=self.total_params,
            trainable_percent=100 * self.trainable_params / self.total_params,
            precision=self.precision,
            cpu_heap=self.cpu_heap,
            lr=self.lr,
            num_processes=self.accelerator.num_processes,
            estimated_peak_memory_bytes=self.plan.peak_memory_bytes,
            flops_per_token=self.plan.flops_per_token.train,
            # Per device: real_tokens counts every process's tokens, so one device's share against its peak.
            mfu=mfu(self.plan.flops_per_token.train,
                    self.state["real_tokens"] / wall / self.accelerator.num_processes if wall else None,
                    peak_flops(self.device, self.precision)),
        )


def _check_weight_files(folder) -> None:
    """Refuse a saved model with a weight file that holds no tensors or a zero-sized one.

    A sharded save (FSDP, ZeRO-3) that skipped the gather writes exactly that, and nothing fails until
    someone loads the adapter: a run that completes with it is worse than one that fails here.
    """
    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        raise TunelabError(f"{folder}: saving wrote no .safetensors weights")
    for f in files:
        with safe_open(f, framework="pt") as weights:
            names = list(weights.keys())
            empty = [n for n in names if math.prod(weights.get_slice(n).get_shape()) == 0]
        if not names or empty:
            what = f"zero-sized tensors, e.g. {empty[0]}" if empty else "no tensors"
            raise TunelabError(
                f"{f.relative_to(folder)} was saved with {what}, so the run is not complete (under FSDP or "
                "ZeRO-3 this means the weights were not gathered from the processes that hold them)"
            )


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}


def _headline(metrics: dict) -> str:
    """One validation line: the loss first (it moves before accuracy does, and shows overfitting first)."""
    if "accuracy" in metrics:
        return f"loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}  f1_macro {metrics['f1_macro']:.4f}"
    return f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.2f}"


