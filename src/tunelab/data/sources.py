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
# The largest JSON line (or JSON array item) read, in bytes: 16 MiB is ~4M tokens of text, far past any
# model's context. A bigger one is a broken file (a missing newline, a binary blob) that would otherwise be
# read whole into memory before anything could say which line it is.
MAX_RECORD_BYTES = 16 * 2**20
BOM = "\ufeff"  # what Windows tools put at the start of a UTF-8 file; CSV and JSON readers skip it


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
    if suffix == ".json" and _starts_with(path, b"["):
        records = _read_json_array(path)
    elif suffix in (".jsonl", ".json"):
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


def _too_big(path: Path, where: int | str) -> DataError:
    return DataError(f"{path}:{where}: record is over {MAX_RECORD_BYTES:,} bytes (the per-record limit); "
                     "is a newline missing between records?")


def _lines(path: Path):
    """(line number, bytes) of each line, refusing one over MAX_RECORD_BYTES before it is read whole."""
    with path.open("rb") as f:
        lineno = 0
        while raw := f.readline(MAX_RECORD_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                raise _too_big(path, lineno)
            yield lineno, raw


def _read_jsonl(path: Path, lenient_utf8: bool = False) -> list[Record]:
    records = []
    for lineno, raw in _lines(path):
        bad = False
        if lineno == 1 and raw.startswith(BOM.encode()):
            raw = raw[len(BOM.encode()):]
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
            hint = ("; a .json file holds either one JSON array of objects or one object per line (JSON Lines)"
                    if path.suffix.lower() == ".json" else "")
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno}){hint}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(Record(f"{path}:{lineno}", obj, bad))
    return records


def _starts_with(path: Path, char: bytes) -> bool:
    """Whether the file's first character after a BOM and whitespace is `char`."""
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(BOM.encode()).lstrip()
    return head[:1] == char


def _read_json_array(path: Path) -> list[Record]:
    """A .json file holding one JSON array of objects; each record's `where` is the line its object starts on."""
    size = path.stat().st_size
    if size > 64 * MAX_RECORD_BYTES:
        raise DataError(f"{path}: a JSON array of {size:,} bytes is read whole; save it as JSON Lines "
                        "(one object per line, .jsonl) instead")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as err:
        lineno = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    records: list[Record] = []

    def line_at(i: int) -> int:
        return text.count("\n", 0, i) + 1

    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == "]" and not records:
            break  # []: read_records says the file is empty
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON in the array ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line_at(pos)}: expected a JSON object in the array, got {type(obj).__name__}")
        if end - pos > MAX_RECORD_BYTES:
            raise _too_big(path, line_at(pos))
        records.append(Record(f"{path}:{line_at(pos)}", obj))
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            break
        raise DataError(f"{path}:{line_at(pos)}: invalid JSON in the array (expected ',' or ']' after an object)")
    rest = text[pos + 1:].strip()
    if rest:
        raise DataError(f"{path}:{line_at(pos + 1 + text[pos + 1:].index(rest[0]))}: text after the JSON array's "
                        "closing ']'")
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
