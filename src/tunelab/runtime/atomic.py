"""Writes that are all or nothing: a file or folder appears under its final name only once it is complete.

Everything is written under a temporary sibling name and renamed into place (`os.replace` is atomic within
a filesystem). A crash mid-write leaves only the temporary name, which no reader looks for, never a file
that looks complete but is not: a half-written metrics.json would make a failed run look finished, a
half-written checkpoint would be resumed from.

A rename is atomic, but not durable by itself: after a power loss the kernel may have stored the rename and
not yet the data, leaving a complete-looking name over empty or partial files. So the data is flushed to disk
(fsync) before the rename, and the folder that holds the new name after it. Temporary names start with a dot
and end in `.tmp`; `remove_temporaries` clears the ones a killed process left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents to disk (a folder's: the names in it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows, for folders) cannot sync a folder; the rename is still atomic
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every folder, deepest first."""
    folders = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        folders += [Path(dirpath) / d for d in dirnames]
    for folder in reversed(folders):
        fsync_path(folder)


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders (`.NAME.tmp`, `.NAME.PID.tmp`) that interrupted writes left in
    `folder`; returns what was removed. Only for a folder no other process is writing to."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


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
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the block failed


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block ends without an error its contents are
    flushed to disk and it replaces `final` (an older folder of that name is moved aside first and then
    removed), else it is deleted. When the block returns, `final` is durable.

    The temporary name is fixed (`.NAME.tmp`), so one left by a killed process is cleared by the next write.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    old = final.with_name(f".{final.name}.old.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
