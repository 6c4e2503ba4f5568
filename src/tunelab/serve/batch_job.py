"""`tunelab batch`: offline inference over a JSONL file, resumable after a kill.

Input: one JSON object per line with an "id" (any string or number; the line number when absent) and
  classification runs: "text"
  generation runs:     "messages" (a conversation; instruction runs), or "prompt" (instruction runs: the
                       instruction, rendered with the run's template, as `tunelab generate` does; causal_lm
                       runs: text to continue)
Output: one JSON line per input id, {"id": ..., <result>}, in input order.

Resuming: the output file is the only record of progress. On start, the ids already in it are skipped;
a last line cut short by a kill (no newline, or not valid JSON) is truncated away first. Each group of
results is appended with one write() and fsync'd, so after any kill the file holds whole lines for a
prefix of the work and at most one partial line, which the next run removes: no id is lost or repeated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import DataError, TunelabError
from tunelab.serve.engine import ClassifyJob, GenerationJob, run_classify, run_generate


@dataclass
class BatchItem:
    id: object
    line: int
    record: dict


def read_items(path: Path, task: str) -> list[BatchItem]:
    if not path.is_file():
        raise TunelabError(f"{path}: input file not found")
    items, seen = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        item_id = record.get("id", n)
        if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
            raise DataError(f"{path}:{n}: 'id' must be a string or an integer")
        if item_id in seen:
            raise DataError(f"{path}:{n}: id {item_id!r} repeats line {seen[item_id]}; ids must be unique")
        seen[item_id] = n
        fields = ("text",) if task == "classification" else ("messages", "prompt")
        if not any(isinstance(record.get(f), (str, list)) and record.get(f) for f in fields):
            raise DataError(f"{path}:{n}: needs a non-empty " + " or ".join(f"'{f}'" for f in fields)
                            + f" field for a {task} model")
        items.append(BatchItem(item_id, n, record))
    if not items:
        raise DataError(f"{path}: no input lines")
    return items


def finished_ids(output: Path, known: set) -> set:
    """Ids already answered in `output`, after cutting away a partial last line left by a kill."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a cut-off line
    done = set()
    for n, line in enumerate(data[:keep].decode("utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{output}:{n}: not a line tunelab batch wrote (invalid JSON); "
                            "move the file away to start over") from None
        if row.get("id") not in known:
            raise DataError(f"{output}:{n}: id {row.get('id')!r} is not in the input: this output belongs to "
                            "another job; pick another --output")
        done.add(row["id"])
    if keep < len(data):
        with open(output, "r+b") as f:
            f.truncate(keep)
    return done


def _results(served, items: list[BatchItem], max_new_tokens: int | None) -> list[dict]:
    if served.task == "classification":
        job = ClassifyJob([it.record["text"] for it in items])
        run_classify(served.trained, [job])
        return [{"id": it.id, **r} for it, r in zip(items, job.results)]
    jobs = []
    limit = max_new_tokens or served.trained.cfg.eval.max_new_tokens
    for it in items:
        rec = it.record
        if rec.get("messages"):
            ids = served.chat_ids(rec["messages"])
        elif served.task == "instruction":
            ids = served.chat_ids([{"role": "user", "content": rec["prompt"]}])
        else:
            ids = served.encode(rec["prompt"])
        if len(ids) + limit > served.context_length:
            raise DataError(f"line {it.line}: prompt ({len(ids)} tokens) + {limit} new tokens is over the model's "
                            f"context of {served.context_length}")
        jobs.append(GenerationJob(ids, limit, temperature=0.0))
    run_generate(served.trained, jobs, served.trained.cfg.eval.repetition_penalty)
    return [{"id": it.id, "completion": job.text, "finish_reason": job.finish_reason,
             "prompt_tokens": len(job.prompt_ids), "completion_tokens": job.completion_tokens}
            for it, job in zip(items, jobs)]


def run_batch(source: str | Path, input_path: Path, output: Path, batch_size: int = 16,
              max_new_tokens: int | None = None, progress=None, trust_remote_code: bool = False) -> dict:
    """Answer every input id not yet in `output`. progress(done, total) is called after each group."""
    from tunelab.serve.registry import ModelRegistry, parse_source

    name, path = parse_source(str(source))
    served = ModelRegistry(trust_remote_code=trust_remote_code).load(name, path)
    items = read_items(input_path, served.task)
    done = finished_ids(output, {it.id for it in items})
    todo = [it for it in items if it.id not in done]
    if progress:
        progress(len(done), len(items))
    output.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for start in range(0, len(todo), batch_size):
            group = todo[start:start + batch_size]
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _results(served, group, max_new_tokens))
            data = lines.encode("utf-8")
            while data:  # a regular file takes it in one call; loop in case the kernel accepts less
                data = data[os.write(fd, data):]
            os.fsync(fd)
            if progress:
                progress(len(done) + start + len(group), len(items))
    finally:
        os.close(fd)
    return {"total": len(items), "skipped": len(done), "written": len(todo), "task": served.task}
