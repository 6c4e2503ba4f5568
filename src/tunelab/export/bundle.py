"""An export folder: built under a temporary name, checked, and only then given its final name.

  DIR/export.json   what the folder holds (schema below), written last; its presence means the export passed
  DIR/...           the format's own files (see hf_formats.py, onnx_format.py, gguf_format.py)

While an export is built it lives in `.DIR.export-PID.tmp` beside DIR. If parity fails, or anything else goes
wrong, that folder is deleted and DIR is never created: nothing that looks finished is left behind. A folder
left by a killed export (its process is gone) is removed by the next export to the same DIR.

export.json (schema 1):
  schema, created, tunelab_version, format, quantize ("int8" or null)
  source: {run, task, method, base_model, config (the run's resolved config, as a mapping), git_commit}
  files: {relative path: sha256}, every file in the folder but export.json
  tokenizer: {chat_template, eos_token_id, pad_token_id, bos_token_id, template ("chat", "alpaca" or null)}
  labels: class names in head order ([] for language models)
  classifier: {pooling, head_file} for classification exports, else null
  parity: the report (parity.py): inputs used, checks with value, threshold and pass, accuracy/perplexity;
          when max |delta logit| was over the fixed limit of merged or adapter, fp32_noise_floor (noise_floor.py)
          and, in the check, the fixed limit, the factor, the ceiling and limit_reason
  notes: format-specific facts a user needs (e.g. what QLoRA's merge was measured against)
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runtime.atomic import atomic_write_json
from tunelab.runtime.run_dir import sha256

EXPORT_SCHEMA = 1
EXPORT_JSON = "export.json"
TMP_SUFFIX = ".tmp"


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_JSON).is_file()


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.export-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(final: Path) -> list[Path]:
    """Remove temporary folders of earlier exports to `final` whose process is gone; returns them."""
    removed = []
    if not final.parent.is_dir():
        return removed
    for tmp in final.parent.glob(_tmp_prefix(final) + "*" + TMP_SUFFIX):
        pid_text = tmp.name[len(_tmp_prefix(final)):-len(TMP_SUFFIX)]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            continue  # another export to the same DIR is running right now
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


@contextmanager
def staging(final: str | Path, overwrite: bool = False):
    """Yield an empty temporary folder beside `final`. The caller calls `publish(tmp, final, record)` once
    the export passed; if the block raises, the folder is deleted and `final` is left as it was."""
    final = Path(final)
    if final.exists() and not overwrite:
        what = "an export" if is_export(final) else "a folder"
        raise TunelabError(f"--output {final}: {what} is already there; pick another --output or add --overwrite")
    if final.exists() and not final.is_dir():
        raise TunelabError(f"--output {final}: is a file, not a folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = final.parent / f"{_tmp_prefix(final)}{os.getpid()}{TMP_SUFFIX}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != EXPORT_JSON}


def _tunelab_version() -> str | None:
    try:
        return version("tunelab")
    except PackageNotFoundError:
        return None


def publish(tmp: Path, final: Path, record: dict) -> dict:
    """Write export.json (with every file's sha256) into `tmp`, then rename it to `final`."""
    record = {
        "schema": EXPORT_SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tunelab_version": _tunelab_version(), **record, "files": file_hashes(tmp),
    }
    atomic_write_json(tmp / EXPORT_JSON, record)
    if final.exists():  # --overwrite: the old export goes only once the new one is complete
        old = final.parent / f"{_tmp_prefix(final)}old-{os.getpid()}{TMP_SUFFIX}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return record


def read_record(path: str | Path) -> dict:
    path = Path(path)
    file = path / EXPORT_JSON
    if not file.is_file():
        raise TunelabError(f"{path}: not an export folder (no {EXPORT_JSON})")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TunelabError(f"{file}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if record.get("schema") != EXPORT_SCHEMA:
        raise TunelabError(f"{file}: schema {record.get('schema')!r}; this tunelab reads schema {EXPORT_SCHEMA}")
    return record


def verify_files(path: str | Path, record: dict) -> None:
    """Every file export.json lists is there with its sha256, and no weight file is unlisted."""
    path = Path(path)
    for name, digest in record["files"].items():
        file = path / name
        if not file.is_file():
            raise TunelabError(f"{path}: {name} is missing (listed in {EXPORT_JSON})")
        if sha256(file) != digest:
            raise TunelabError(f"{path}: {name} does not match its sha256 in {EXPORT_JSON} (changed after export)")
    extra = [str(p.relative_to(path)) for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != EXPORT_JSON and str(p.relative_to(path)) not in record["files"]]
    if extra:
        raise TunelabError(f"{path}: {extra[0]} is not listed in {EXPORT_JSON} (added after export)")
