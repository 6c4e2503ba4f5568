"""Run one group of requests on one loaded model: the part of serving that touches torch.

Classification concatenates the texts of every request in the group and runs them through the run's own
`TrainedModel.predict` (same tokenization, truncation, pooling and head as training and `tunelab predict`).

Routing (model `auto`) runs the router's embedder and classifiers over the group's texts; each text then goes
to its task adapter as a classification job of its own, batched with that adapter's other requests.

Generation decodes the whole group together through transformers' `generate`, left-padded, and lets each
sequence stop on its own. Why not call `generate` with its own sampling options: those are one setting per
call, while each request carries its own temperature, top_p, seed, stop strings and max_tokens, and wants
its text streamed as it comes. So sampling runs in a logits processor (one torch.Generator per request,
so a seed reproduces a request whatever else shares its batch) and stopping in a stopping criterion that
also hands each new piece of text to the request's stream. Greedy rows (temperature 0) go through exactly
the path `tunelab generate` takes: argmax after the run's repetition penalty.
"""

from __future__ import annotations

import secrets
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from tunelab.evaluate.runner import autocast

# PEFT says this on every prompt-tuning generate call; it drops position ids by design and the answer is right.
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")


@dataclass
class ClassifyJob:
    texts: list[str]
    results: list[dict] | None = None
    prompt_tokens: int = 0


@dataclass
class RouteJob:
    """model `auto`: which task adapter each text goes to, as (task, router probability)."""

    texts: list[str]
    routes: list[tuple[str, float]] | None = None


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_delta: Callable[[str], None] | None = None  # called on the engine thread with each new piece of text
    # filled in while decoding
    token_ids: list[int] = field(default_factory=list)  # generated tokens, without the final EOS
    completion_tokens: int = 0  # every generated token, EOS included (what `tunelab generate` counts)
    text: str = ""  # always the concatenation of what on_delta was given, so streamed == not streamed
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    first_token_time: float | None = None
    cancelled: bool = False  # the client went away: stop spending compute on it

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled


def run_classify(trained, jobs: list[ClassifyJob]) -> None:
    texts = [t for job in jobs for t in job.texts]
    results = trained.predict(texts)
    lengths = [len(ids) for ids in trained.tokenizer(texts, truncation=True,
                                                     max_length=trained.cfg.data.max_length)["input_ids"]]
    start = 0
    for job in jobs:
        n = len(job.texts)
        job.results = [{k: v for k, v in r.items() if k != "text"} for r in results[start:start + n]]
        job.prompt_tokens = sum(lengths[start:start + n])
        start += n


def run_route(router, jobs: list[RouteJob]) -> None:
    """Route every text of the group in one pass of the router's embedder (loaded when the router was)."""
    routes = router.route([t for job in jobs for t in job.texts])
    start = 0
    for job in jobs:
        job.routes = routes[start:start + len(job.texts)]
        start += len(job.texts)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to keep out of the stream for now: an unfinished UTF-8 character (decoded
    as U+FFFD) or the start of a stop string, which would have to be taken back if the stop completes."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


class _RowSampler(LogitsProcessor):
    """Per-row temperature and nucleus (top_p) sampling. A sampled row's scores become -inf except at the
    drawn token, so `generate`'s greedy argmax picks it; greedy rows are left untouched."""

    def __init__(self, jobs: list[GenerationJob]):
        self.jobs = jobs
        self.generators = []
        for job in jobs:
            gen = None
            if job.temperature > 0:
                gen = torch.Generator()
                gen.manual_seed(job.seed if job.seed is not None else secrets.randbits(63))
            self.generators.append(gen)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, (job, gen) in enumerate(zip(self.jobs, self.generators)):
            if gen is None or job.done:
                continue
            logits = scores[i].float() / job.temperature
            probs = logits.softmax(-1)
            if job.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # keep the smallest set whose mass reaches top_p (the most likely token always stays)
                outside = sorted_probs.cumsum(-1) - sorted_probs >= job.top_p
                probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
            token = torch.multinomial(probs.cpu(), 1, generator=gen).item()
            row = torch.full_like(scores[i], float("-inf"))
            row[token] = 0.0
            scores[i] = row
        return scores


class _RowStopper(StoppingCriteria):
    """Reads each row's newest token, streams its text, and says which rows are finished."""

    def __init__(self, jobs: list[GenerationJob], tokenizer, eos_id: int):
        self.jobs, self.tokenizer, self.eos_id = jobs, tokenizer, eos_id

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        now = time.perf_counter()
        newest = input_ids[:, -1].tolist()
        for job, token in zip(self.jobs, newest):
            if job.done:
                continue
            job.first_token_time = job.first_token_time or now
            job.completion_tokens += 1
            if token == self.eos_id:
                job.finish_reason = "stop"
            else:
                job.token_ids.append(token)
                if job.completion_tokens >= job.max_tokens:
                    job.finish_reason = "length"
            self._advance(job)
        return torch.tensor([job.done for job in self.jobs], device=input_ids.device)

    def _advance(self, job: GenerationJob) -> None:
        full = self.tokenizer.decode(job.token_ids, skip_special_tokens=True)
        cut = min((i for i in (full.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            full, job.finish_reason = full[:cut], "stop"
        if job.finish_reason is None:
            full = full[: len(full) - _held_back(full, job.stop)]
        if not full.startswith(job.text) or len(full) == len(job.text):
            return  # nothing new yet (or a decode that rewrote earlier text: keep what was sent)
        delta = full[len(job.text):]
        job.text = full
        if job.on_delta is not None:
            job.on_delta(delta)


def run_generate(trained, jobs: list[GenerationJob], repetition_penalty: float) -> None:
    """Decode every job together; each ends at EOS, a stop string or its own max_tokens."""
    tokenizer = trained.tokenizer
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(job.prompt_ids) for job in jobs)
    # Left padding, so every row's next token comes from its last column.
    input_ids = torch.tensor([[pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
    mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
    backbone = trained.model.backbone
    with torch.inference_mode(), autocast(trained.device, trained.precision):
        backbone.generate(
            input_ids=input_ids.to(trained.device), attention_mask=mask.to(trained.device),
            max_new_tokens=max(job.max_tokens for job in jobs), do_sample=False,
            repetition_penalty=repetition_penalty, eos_token_id=eos_id, pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([_RowSampler(jobs)]),
            stopping_criteria=StoppingCriteriaList([_RowStopper(jobs, tokenizer, eos_id)]),
        )
    for job in jobs:
        job.finish_reason = job.finish_reason or "length"
