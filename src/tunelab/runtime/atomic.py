"""Writes that are all or nothing: a file or folder appears under its final name only once it is complete.

Everything is written under a temporary sibling name and renamed into place (`os.replace` is atomic within
a filesystem). A crash mid-write leaves only the temporary name, which no reader looks for, never a file
that looks complete but is not: a half-written metrics.json would make a failed run look finished, a
half-written checkpoint would be resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_writer(path: str | Path, newline: str | None = None) -> Iterator[IO[str]]:
    """Open a text file for writing that takes the name `path` only when the block ends without an error.

    The temporary name holds the process id: under `accelerate launch` two processes may write the same
    file at once (both recording a failure), and neither may rename the other's half-written copy.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the block failed


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block ends without an error it replaces
    `final` (an older folder of that name is removed first), else it is deleted.

    The temporary name is fixed (`.NAME.tmp`), so one left by a killed process is cleared by the next write.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
