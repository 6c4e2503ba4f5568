"""Read raw records from JSONL, CSV and Parquet files (or a `datasets` hub name when online).

Each record keeps where it came from (file and line, or row for Parquet), so every later check can say
exactly which line is wrong. Nothing here knows about tasks; see `examples.py` for the field checks.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Record:
    where: str  # "data/train.jsonl:17" -- used verbatim in error messages
    fields: dict
    bad_utf8: bool = False  # read with lenient_utf8: the line held bytes that are not UTF-8 (shown as U+FFFD)


def read_records(source: str, lenient_utf8: bool = False) -> list[Record]:
    """lenient_utf8: decode a line that is not valid UTF-8 with replacement characters and mark its record,
    instead of stopping (`tunelab data check` reports such lines; training refuses them)."""
    if source.startswith("hub:"):
        return _read_hub(source)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = _read_jsonl(path, lenient_utf8)
    elif suffix == ".csv":
        records = _read_csv(path, lenient_utf8)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise DataError(f"{source}: unsupported file type '{suffix}'; use one of {', '.join(SUFFIXES)}")
    if not records:
        raise DataError(f"{source}: file is empty (no records)")
    return records


def _decode_line(path: Path, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
            "re-save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path, lenient_utf8: bool = False) -> list[Record]:
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            bad = False
            if lenient_utf8:
                try:
                    text = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    text, bad = raw.decode("utf-8", errors="replace").strip(), True
            else:
                text = _decode_line(path, lineno, raw).strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(Record(f"{path}:{lineno}", obj, bad))
    return records


def _read_csv(path: Path, lenient_utf8: bool = False) -> list[Record]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if lenient_utf8:  # rows holding U+FFFD are the bad ones (data/quality.py reports them)
            return _parse_csv(path, raw.decode("utf-8-sig", errors="replace"), mark_replacements=True)
        lineno = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); re-save the file as UTF-8"
        ) from None
    return _parse_csv(path, text)


def _parse_csv(path: Path, text: str, mark_replacements: bool = False) -> list[Record]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return []
    records = []
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more values than the {len(reader.fieldnames)} header columns")
            if all(v in (None, "") for v in row.values()):
                continue
            fields = {k: v for k, v in row.items() if v is not None}
            bad = mark_replacements and any("\ufffd" in str(v) for v in fields.values())
            records.append(Record(f"{path}:{reader.line_num}", fields, bad))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    return [Record(f"{path}:row {i + 1}", row) for i, row in enumerate(rows)]


def _read_hub(source: str) -> list[Record]:
    """`hub:NAME` or `hub:NAME:SPLIT` through the `datasets` library (online only)."""
    parts = source[len("hub:"):].split(":")
    name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading hub datasets needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, unknown split
        raise DataError(f"{source}: cannot load from the hub ({str(err).splitlines()[0]})") from None
    return [Record(f"{source}:row {i + 1}", dict(row)) for i, row in enumerate(ds)]
