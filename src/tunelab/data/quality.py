"""Data checks before a training run: duplicates, leakage, labels, broken text, token lengths.

`tunelab data check FILE... [--against TEST]` runs all of them; `tunelab train` runs the cheap ones
(exact duplicates and exact leakage, one hash per row) before the model loads. Every finding names the file
and the line, so a user can open the row and decide.

The checks, by the name a `--fail-on` rule uses (`duplicates>1%,leakage>0`):

  duplicates        rows whose normalised text repeats an earlier row of the same file
  near_duplicates   rows whose word 3-grams overlap an earlier row's by Jaccard >= 0.8 (near_duplicates.py)
  conflicting_labels  duplicated texts carrying different labels
  leakage           --against rows equal or nearly equal to a row of the checked files
  one_sided_labels  labels found only in the checked files or only in the --against file
  imbalance         rows of the commonest label per row of the rarest (a ratio, not a count)
  empty             texts that are empty or only whitespace
  control_chars     texts holding control characters (other than tab and newline)
  encoding          lines that are not valid UTF-8, or hold mojibake (UTF-8 read as Latin-1: "Ã©")
  truncated         rows longer than --max-length tokens of --model (needs --model)
  empty_outputs     instruction rows with an empty output, or a chat whose last turn is not an answer

A rule compares the count of affected rows (`leakage>0`) or, with `%`, their share of the rows checked.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.near_duplicates import near_duplicates_within, near_matches_across, normalise
from tunelab.data.sources import Record, read_records
from tunelab.errors import ConfigError, DataError

CHECKS = {
    "duplicates": "exact duplicates (normalised text) within a file",
    "near_duplicates": "near duplicates (word 3-gram Jaccard >= 0.8) within a file",
    "conflicting_labels": "the same text with different labels",
    "leakage": "rows of the --against file equal or nearly equal to a checked row",
    "one_sided_labels": "labels on one side only",
    "imbalance": "commonest label / rarest label (rows)",
    "empty": "empty or whitespace-only texts",
    "control_chars": "control characters in the text",
    "encoding": "not UTF-8, or mojibake",
    "truncated": "rows over --max-length tokens",
    "empty_outputs": "instruction rows with no response",
}
CHEAP = ("duplicates", "conflicting_labels", "leakage")  # what `tunelab train` runs (one hash per row)
SHOWN = 10  # rows listed per finding on the terminal (the JSON and HTML report hold more)
KEPT = 200  # rows kept per finding in the report

# UTF-8 bytes decoded as Latin-1/cp1252 turn "é" into "Ã©" and "’" into "â€™": this is the signature.
_MOJIBAKE = re.compile("[ÃÂ][\u0080-\u00bf]|â€[\u0080-\u00bf™œ\u009d˜”“¦¢]")
# Unicode category Cc less tab, newline and carriage return. C1 controls (U+0080-U+009F) in text are nearly
# always Windows-1252 punctuation decoded as Latin-1: U+0096 was an en dash, U+0085 an ellipsis.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass
class Row:
    where: str  # "data/train.jsonl:17"
    text: str  # every text field of the example, joined: what duplicates and leakage compare
    label: str | None = None
    fields: dict[str, str] = field(default_factory=dict)  # the text fields by name, for the empty checks
    bad_utf8: bool = False
    no_response: bool = False  # instruction/chat rows without an answer to learn
    messages: list[dict] | None = None  # chat rows: the conversation as written

    @property
    def line(self) -> str:
        return self.where.rsplit(":", 1)[-1]


@dataclass
class DataFile:
    path: str
    role: str  # "checked" or "against"
    kind: str  # classification, causal_lm, instruction
    rows: list[Row]


@dataclass
class Finding:
    check: str
    file: str
    count: float  # rows affected (the ratio for imbalance)
    total: int  # rows checked
    rows: list[str] = field(default_factory=list)  # one line per affected row, e.g. "line 17 repeats line 3"

    @property
    def share(self) -> float:
        return 100 * self.count / self.total if self.total else 0.0


@dataclass
class QualityReport:
    files: list[DataFile]
    findings: list[Finding]
    labels: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> label -> rows
    lengths: dict[str, list[int]] = field(default_factory=dict)  # file -> token length of each row
    model: str | None = None
    max_length: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def totals(self) -> dict[str, Finding]:
        """One finding per check, summed over files (imbalance: the largest ratio)."""
        out: dict[str, Finding] = {}
        for f in self.findings:
            t = out.setdefault(f.check, Finding(f.check, "all", 0, 0))
            if f.check == "imbalance":
                t.count, t.total = max(t.count, f.count), 1
            else:
                t.count, t.total = t.count + f.count, t.total + f.total
        return out

    def summary_rows(self) -> list[list[str]]:
        """One row per check: its name, what it looks for, what it found over all files."""
        rows = []
        for check, t in self.totals().items():
            if check == "imbalance":
                found = f"{t.count:.1f}x"
            else:
                found = f"{int(t.count):,} of {t.total:,} ({t.share:.2f}%)" if t.count else "none"
            rows.append([check, CHECKS[check], found])
        return rows

    def to_json(self) -> dict:
        return {
            "files": [{"path": f.path, "role": f.role, "kind": f.kind, "rows": len(f.rows)} for f in self.files],
            "model": self.model, "max_length": self.max_length,
            "totals": {k: {"count": t.count, "total": t.total} for k, t in self.totals().items()},
            "findings": [{"check": f.check, "file": f.file, "count": f.count, "total": f.total,
                          "rows": f.rows[:KEPT]} for f in self.findings],
            "labels": self.labels,
            "token_lengths": {p: length_stats(v, self.max_length) for p, v in self.lengths.items()},
            "seconds": self.seconds,
            "summary": self.summary_rows(),
        }


# --------------------------------------------------------------------------- rules


@dataclass
class Rule:
    check: str
    op: str
    value: float
    percent: bool

    def __str__(self) -> str:
        return f"{self.check}{self.op}{self.value:g}{'%' if self.percent else ''}"

    def met_by(self, finding: Finding | None) -> bool:
        if finding is None:
            return False
        seen = finding.share if self.percent else finding.count
        return seen > self.value if self.op == ">" else seen >= self.value


_RULE = re.compile(r"^\s*([a-z_]+)\s*(>=|>)\s*([0-9.]+)\s*(%?)\s*$")


def parse_rules(text: str | None) -> list[Rule]:
    """`duplicates>1%,leakage>0` -> rules; an unknown check or bad syntax is one line naming the valid ones."""
    rules = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        m = _RULE.match(part)
        if not m:
            raise ConfigError(f"rule '{part.strip()}' must look like NAME>VALUE or NAME>VALUE%, e.g. duplicates>1%")
        name, op, value, percent = m.groups()
        if name not in CHECKS:
            raise ConfigError(f"rule '{part.strip()}': unknown check '{name}'; checks: {', '.join(CHECKS)}")
        try:
            rules.append(Rule(name, op, float(value), bool(percent)))
        except ValueError:
            raise ConfigError(f"rule '{part.strip()}': '{value}' is not a number") from None
    return rules


def rules_met(report: QualityReport, rules: list[Rule]) -> list[str]:
    totals = report.totals()
    return [f"{rule} (found {_amount(totals[rule.check], rule.percent)})"
            for rule in rules if rule.met_by(totals.get(rule.check))]


def _amount(f: Finding, percent: bool) -> str:
    if percent:
        return f"{f.share:.2f}% of {f.total:,} rows"
    return f"{f.count:.1f}" if f.check == "imbalance" else f"{int(f.count):,}"


# --------------------------------------------------------------------------- reading


def detect_kind(fields: dict, columns: dict[str, str]) -> str:
    has = {name for name in ("text", "label", "instruction", "output", "messages") if columns.get(name, name) in fields}
    if "messages" in has or {"instruction", "output"} <= has:
        return "instruction"
    if {"text", "label"} <= has:
        return "classification"
    if "text" in has:
        return "causal_lm"
    return ""


def row_from_fields(fields: dict, where: str, kind: str, columns: dict[str, str] | None = None,
                    bad_utf8: bool = False) -> Row:
    """One row from a record's fields (raw, or a checked example: the same keys after column mapping)."""
    columns = columns or {}

    def get(name: str) -> str:
        value = fields.get(columns.get(name, name))
        return "" if value is None else str(value)

    msgs_key = columns.get("messages", "messages")
    if kind == "instruction" and isinstance(fields.get(msgs_key), list):
        msgs = [m for m in fields[msgs_key] if isinstance(m, dict)]
        texts = {f"messages[{i}]": str(m.get("content") or "") for i, m in enumerate(msgs)}
        last = msgs[-1] if msgs else {}
        no_response = last.get("role") != "assistant" or not str(last.get("content") or "").strip()
        messages = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in msgs]
        return Row(where, "\n".join(texts.values()), None, texts, bad_utf8, no_response, messages)
    if kind == "instruction":
        texts = {"instruction": get("instruction"), "input": get("input"), "output": get("output")}
        return Row(where, "\n".join(texts.values()), None, texts, bad_utf8, not texts["output"].strip())
    label = get("label").strip() if kind == "classification" else None
    return Row(where, get("text"), label, {"text": get("text")}, bad_utf8)


def read_file(path: str, role: str, kind: str | None, columns: dict[str, str]) -> DataFile:
    records: list[Record] = read_records(path, lenient_utf8=True)
    found_kind = kind or detect_kind(records[0].fields, columns)
    if not found_kind:
        found = ", ".join(map(str, records[0].fields)) or "none"
        raise DataError(f"{records[0].where}: cannot tell the task from the fields (found: {found}); "
                        "give --task and map your columns with --columns text=COLUMN,label=COLUMN")
    return DataFile(path, role, found_kind,
                    [row_from_fields(r.fields, r.where, found_kind, columns, r.bad_utf8) for r in records])


def rows_from_examples(examples: list[dict], task: str) -> list[Row]:
    """Checked training examples (data/examples.py) as rows, for the cheap checks `tunelab train` runs."""
    rows = [row_from_fields(ex, ex["where"], task) for ex in examples]
    # Splits are shuffled; in file order, "line 9 repeats line 3" names the later line as the repeat.
    return sorted(rows, key=lambda r: (r.where.rsplit(":", 1)[0], int(r.line) if r.line.isdigit() else 0))


# --------------------------------------------------------------------------- the checks


def exact_duplicates(rows: list[Row]) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """(row, first row with the same normalised text) pairs, and the normalised-text index of first rows."""
    first: dict[str, int] = {}
    pairs = []
    for i, row in enumerate(rows):
        key = normalise(row.text)
        if not key:
            continue
        if key in first:
            pairs.append((i, first[key]))
        else:
            first[key] = i
    return pairs, first


def _within(f: DataFile, near: bool, indexes: dict | None = None) -> list[Finding]:
    """Duplicates inside one file; with near, also near duplicates (its LSH index is kept in `indexes`
    for the leakage check)."""
    rows, total = f.rows, len(f.rows)
    pairs, _ = exact_duplicates(rows)
    out = [Finding("duplicates", f.path, len(pairs), total,
                   [f"line {rows[i].line} repeats line {rows[j].line}" for i, j in pairs])]
    if f.kind == "classification":
        conflicts = [(i, j) for i, j in pairs if rows[i].label != rows[j].label]
        out.append(Finding("conflicting_labels", f.path, len(conflicts), total,
                           [f"line {rows[i].line} ('{rows[i].label}') repeats line {rows[j].line} ('{rows[j].label}')"
                            for i, j in conflicts]))
    if near:
        matches, index = near_duplicates_within([r.text for r in rows], {i for i, _ in pairs})
        if indexes is not None:
            indexes[f.path] = index
        out.append(Finding("near_duplicates", f.path, len(matches), total,
                           [f"line {rows[m.row].line} ~ line {rows[m.other].line} (Jaccard {m.similarity:.2f})"
                            for m in matches]))
    return out


def _leakage(checked: list[DataFile], against: DataFile, indexes: dict | None = None) -> Finding:
    """Rows of `against` equal (normalised) or, given the checked files' LSH indexes, nearly equal to a checked row."""
    reference = [row for f in checked for row in f.rows]
    index = {normalise(row.text): row for row in reversed(reference) if row.text.strip()}
    lines, exact = [], set()
    for j, row in enumerate(against.rows):
        hit = index.get(normalise(row.text)) if row.text.strip() else None
        if hit is not None:
            exact.add(j)
            lines.append(f"line {row.line} equals {_short(hit.where)}")
    if indexes:
        files = [f for f in checked if f.path in indexes]
        for m, n in near_matches_across([indexes[f.path] for f in files], [r.text for r in against.rows], exact):
            lines.append(f"line {against.rows[m.row].line} ~ {_short(files[n].rows[m.other].where)} "
                         f"(Jaccard {m.similarity:.2f})")
    return Finding("leakage", against.path, len(lines), len(against.rows), lines)


def _short(where: str) -> str:
    path, line = where.rsplit(":", 1)
    return f"{Path(path).name}:{line}"


def _text_problems(f: DataFile) -> list[Finding]:
    empty, control, encoding, no_response = [], [], [], []
    for row in f.rows:
        # `input` may be empty; an empty output is reported under empty_outputs
        blank = [name for name, value in row.fields.items() if not value.strip() and name not in ("input", "output")]
        if blank:
            empty.append(f"line {row.line}: {', '.join(blank)} empty")
        bad_chars = sorted({f"U+{ord(c):04X}" for c in _CONTROL.findall(row.text)})
        if bad_chars:
            hint = " (Windows-1252 punctuation read as Latin-1?)" if any("U+0080" <= c <= "U+009F" for c in bad_chars) else ""
            control.append(f"line {row.line}: {', '.join(bad_chars[:4])}{hint}")
        if row.bad_utf8:
            encoding.append(f"line {row.line}: not valid UTF-8")
        else:
            m = _MOJIBAKE.search(row.text)
            if m:
                encoding.append(f"line {row.line}: mojibake {m.group()!r} (UTF-8 read as Latin-1)")
        if row.no_response:
            no_response.append(f"line {row.line}: no response to learn")
    total = len(f.rows)
    out = [Finding("empty", f.path, len(empty), total, empty),
           Finding("control_chars", f.path, len(control), total, control),
           Finding("encoding", f.path, len(encoding), total, encoding)]
    if f.kind == "instruction":
        out.append(Finding("empty_outputs", f.path, len(no_response), total, no_response))
    return out


def _labels(files: list[DataFile], against: DataFile | None) -> tuple[dict[str, dict[str, int]], list[Finding]]:
    counts = {f.path: dict(sorted(Counter(r.label for r in f.rows if r.label).items()))
              for f in files + ([against] if against else []) if f.kind == "classification"}
    findings = []
    checked = Counter()
    for f in files:
        checked.update(counts.get(f.path, {}))
    if checked:
        ratio = max(checked.values()) / min(checked.values())
        rare = min(checked, key=checked.get)
        findings.append(Finding("imbalance", "checked files", round(ratio, 2), 1,
                                [f"commonest '{max(checked, key=checked.get)}' {max(checked.values()):,} rows, "
                                 f"rarest '{rare}' {checked[rare]:,} rows"]))
    if checked and against is not None and against.path in counts:
        other = counts[against.path]
        lines = [f"label '{name}': {checked[name]:,} checked rows, none in {Path(against.path).name}"
                 for name in checked if name not in other]
        lines += [f"label '{name}': {other[name]:,} rows in {Path(against.path).name}, none checked"
                  for name in other if name not in checked]
        findings.append(Finding("one_sided_labels", "both sides", len(lines), len(set(checked) | set(other)), lines))
    return counts, findings


def token_lengths(f: DataFile, tokenizer, template: str = "auto") -> list[int]:
    """Each row's length in the model's tokens, as training would build it (special tokens, EOS, prompt
    template included), before truncation."""
    from tunelab.data.templates import choose_template
    from tunelab.data.tokenize import tokenize_instruction

    if f.kind == "instruction":
        examples = [_example(r) for r in f.rows]
        features, _ = tokenize_instruction(examples, tokenizer, 10**9, choose_template(template, tokenizer))
        return [len(x["input_ids"]) for x in features]
    ids = tokenizer([r.text for r in f.rows])["input_ids"]
    return [len(x) + (f.kind == "causal_lm") for x in ids]  # causal LM rows end with an added EOS


def _example(row: Row) -> dict:
    if row.messages is not None:
        return {"messages": row.messages or [{"role": "user", "content": ""}]}
    return dict(row.fields)


def _lengths_finding(f: DataFile, lengths: list[int], max_length: int) -> Finding:
    over = [(r, n) for r, n in zip(f.rows, lengths) if n > max_length]
    over.sort(key=lambda rn: -rn[1])
    return Finding("truncated", f.path, len(over), len(f.rows),
                   [f"line {r.line}: {n:,} tokens" for r, n in over])


def length_stats(lengths: list[int], max_length: int | None) -> dict:
    import numpy as np

    if not lengths:
        return {}
    a = np.asarray(lengths)
    stats = {"rows": len(a), "mean": round(float(a.mean()), 1), "p50": int(np.percentile(a, 50)),
             "p90": int(np.percentile(a, 90)), "p99": int(np.percentile(a, 99)), "max": int(a.max())}
    if max_length:
        stats["truncated_share"] = round(float((a > max_length).mean()), 4)
    return stats


def check_files(paths: list[str], against: str | None = None, *, task: str | None = None,
                columns: dict[str, str] | None = None, tokenizer=None, model: str | None = None,
                max_length: int | None = None, template: str = "auto", near: bool = True) -> QualityReport:
    """Every check on the files (and leakage against `against`); tokenizer adds token lengths."""
    columns = columns or {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    files = [read_file(p, "checked", task, columns) for p in paths]
    other = read_file(against, "against", task or files[0].kind, columns) if against else None
    kinds = {f.kind for f in files + ([other] if other else [])}
    if len(kinds) > 1:
        raise DataError(f"the files hold different kinds of data ({', '.join(sorted(kinds))}); check them apart")
    seconds["read"] = time.perf_counter() - start

    findings: list[Finding] = []
    start = time.perf_counter()
    indexes: dict = {}
    for f in files:
        findings += _within(f, near, indexes) + _text_problems(f)
    if other is not None:
        findings += _within(other, near) + _text_problems(other)
        findings.append(_leakage(files, other, indexes if near else None))
    counts, label_findings = _labels(files, other)
    findings += label_findings
    seconds["checks"] = time.perf_counter() - start

    lengths: dict[str, list[int]] = {}
    if tokenizer is not None:
        start = time.perf_counter()
        for f in files + ([other] if other else []):
            lengths[f.path] = token_lengths(f, tokenizer, template)
            if max_length:
                findings.append(_lengths_finding(f, lengths[f.path], max_length))
        seconds["tokenize"] = time.perf_counter() - start
    return QualityReport(files + ([other] if other else []), findings, counts, lengths, model,
                         max_length if tokenizer is not None else None, {k: round(v, 2) for k, v in seconds.items()})


def quick_check(train: list[dict], held_out: list[list[dict]], task: str, train_path: str,
                held_out_paths: list[str]) -> QualityReport:
    """The cheap checks on a run's splits (exact duplicates, exact leakage): one hash per row, no model."""
    checked = DataFile(train_path, "checked", task, rows_from_examples(train, task))
    findings = [f for f in _within(checked, near=False) if f.check in CHEAP]
    files = [checked]
    for examples, path in zip(held_out, held_out_paths, strict=True):
        if examples:
            other = DataFile(path, "against", task, rows_from_examples(examples, task))
            findings.append(_leakage([checked], other))
            files.append(other)
    return QualityReport(files, findings)
