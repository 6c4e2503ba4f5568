"""Dynamic batching: requests that arrive within a window run as one batch, grouped by model.

A batch starts when the first waiting request is `window` seconds old or `max_batch` rows are waiting,
whichever comes first. The batch is split by ServedModel (a reload is a new object, so a batch never mixes
an old and a new version) and by kind, and each group runs on one engine thread: torch already uses every
core for one group, so two groups at once would only fight over them. While a batch runs, new requests
wait, so under load the next batch fills up by itself.

Overload: at most `max_queue` requests wait; past that, submit() raises Overloaded with an estimate of
when to retry, and the app answers 503 with Retry-After instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tunelab.serve.engine import ClassifyJob, GenerationJob, RouteJob, run_classify, run_generate, run_route


class Overloaded(Exception):
    def __init__(self, retry_after_s: float):
        super().__init__(f"server is at capacity; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Pending:
    served: object  # registry.ServedModel
    job: ClassifyJob | RouteJob | GenerationJob
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    batch_size: int = 0

    @property
    def rows(self) -> int:
        return 1 if isinstance(self.job, GenerationJob) else len(self.job.texts)


class Batcher:
    def __init__(self, max_batch: int = 16, window_s: float = 0.01, max_queue: int = 256, metrics=None):
        self.max_batch, self.window_s, self.max_queue, self.metrics = max_batch, window_s, max_queue, metrics
        self._waiting: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tunelab-engine")
        self._seconds_per_batch = 0.1  # running mean, for Retry-After estimates
        self._running: list = []  # the jobs of the group on the engine thread now

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """After uvicorn's graceful period: whatever still decodes has no one waiting for it (or ran out of
        --shutdown-timeout), so it stops at its next token instead of holding the exit for a whole batch."""
        for job in self._running:
            job.cancelled = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def submit(self, served, job) -> _Pending:
        """Queue a job; await the returned pending's future for completion (it holds no result: the job does)."""
        if len(self._waiting) >= self.max_queue:
            batches_ahead = len(self._waiting) / max(1, self.max_batch) + 1
            raise Overloaded(batches_ahead * self._seconds_per_batch)
        pending = _Pending(served, job, asyncio.get_running_loop().create_future())
        self._waiting.append(pending)
        self._set_depth()
        self._wakeup.set()
        return pending

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))

    async def _run(self) -> None:
        while True:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait out the window of the oldest request, unless a full batch is already here.
            while sum(p.rows for p in self._waiting) < self.max_batch:
                left = self._waiting[0].arrived + self.window_s - time.perf_counter()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch, rows = [], 0
            while self._waiting and (not batch or rows + self._waiting[0].rows <= self.max_batch):
                pending = self._waiting.pop(0)
                batch.append(pending)
                rows += pending.rows
            self._set_depth()
            for group in _groups(batch):
                await self._run_group(group)

    async def _run_group(self, group: list[_Pending]) -> None:
        served = group[0].served
        jobs = [p.job for p in group if not (isinstance(p.job, GenerationJob) and p.job.cancelled)]
        rows = sum(p.rows for p in group)
        for p in group:
            p.batch_size = rows
        started = time.perf_counter()
        error = None
        if jobs:
            self._running = jobs
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, _run_jobs, served, jobs)
            except Exception as e:  # one bad group must not stop the server: its requests get the error
                error = e
            finally:
                self._running = []
        elapsed = time.perf_counter() - started
        self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * elapsed
        if self.metrics is not None:
            kind = _KINDS[type(group[0].job)]
            self.metrics.batch_size.labels(served.name, kind).observe(rows)
        for p in group:
            if not p.future.done():
                p.future.set_exception(error) if error else p.future.set_result(None)


_KINDS = {ClassifyJob: "classify", RouteJob: "route", GenerationJob: "generate"}


def _run_jobs(served, jobs: list) -> None:
    if isinstance(jobs[0], ClassifyJob):
        run_classify(served.trained, jobs)
    elif isinstance(jobs[0], RouteJob):
        run_route(served.router, jobs)
    else:
        run_generate(served.trained, jobs, served.trained.cfg.eval.repetition_penalty)


def _groups(batch: list[_Pending]) -> list[list[_Pending]]:
    groups: dict[tuple[int, type], list[_Pending]] = {}
    for p in batch:
        groups.setdefault((id(p.served), type(p.job)), []).append(p)
    return list(groups.values())
