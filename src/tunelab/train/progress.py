"""A rich progress bar with the numbers people watch: loss, learning rate, real tokens/s, ETA.

Real tokens are the non-pad ones: tokens/s counted over padded tensors flatters a run that wastes half
its compute on padding. When stderr is not a terminal (CI, a log file), it prints a plain line every few
percent instead of redrawing a bar.

What the numbers are (docs/02-full-fine-tuning.md#reading-the-console says the same for learners):
  loss       the mean training loss over the optimizer steps since the last logged step (train.log_every),
             a running mean that restarts at every logged step: the value metrics.jsonl records there
  lr         the learning rate the schedule set for the next step
  tok/s      real tokens per second over the same steps
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, console: Console, total: int, start: int = 0, enabled: bool = True):
        self.console, self.total, self.enabled = console, total, enabled
        self.live = console.is_terminal
        self.every = max(1, total // 10)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[real_tokens_per_s]} real tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not (enabled and self.live),
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", lr="-", real_tokens_per_s="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        fields = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "real_tokens_per_s": f"{tokens_per_s:,.0f}"}
        self.progress.update(self.task, completed=step, **fields)
        if self.enabled and not self.live and (step % self.every == 0 or step == self.total):
            self.console.print(
                f"step {step}/{self.total}  loss {fields['loss']}  lr {fields['lr']}  {fields['real_tokens_per_s']} real tok/s"
            )

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)
