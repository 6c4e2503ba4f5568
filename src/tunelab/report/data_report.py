"""The report of `tunelab data check`: data_check.md, a self-contained data_check.html and plots/, plus
data_check.json with every finding (up to 200 rows each)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunelab.data.quality import CHECKS, KEPT, QualityReport, length_stats
from tunelab.report import plots
from tunelab.report.document import Document
from tunelab.report.units import number

LISTED = 50  # rows listed per finding in the HTML/Markdown report


def summary_rows(report: QualityReport) -> list[list[str]]:
    """One row per check: what it looks for and what it found, over all files."""
    rows = []
    for check, t in report.totals().items():
        if check == "imbalance":
            found = f"{t.count:.1f}x"
        else:
            found = f"{int(t.count):,} of {t.total:,} ({t.share:.2f}%)" if t.count else "none"
        rows.append([check, CHECKS[check], found])
    return rows


def write_data_report(report: QualityReport, out_dir: str | Path, rules: list[str], met: list[str]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = Document("Data check")
    files = ", ".join(f"{f.path} ({f.role}, {f.kind}, {len(f.rows):,} rows)" for f in report.files)
    doc.paragraph(f"Files: {files}.")
    if rules:
        doc.paragraph(f"Rules: {', '.join(rules)}. " + (f"Met: {'; '.join(met)}." if met else "None was met."))
    doc.heading("Summary")
    doc.table(["check", "looks for", "found"], summary_rows(report))

    if report.labels:
        doc.heading("Labels")
        names = sorted({name for counts in report.labels.values() for name in counts})
        doc.table(["label"] + [Path(p).name for p in report.labels],
                  [[name] + [number(counts.get(name, 0)) for counts in report.labels.values()] for name in names],
                  numeric=set(range(1, len(report.labels) + 1)))
        shares = {Path(p).name: [100 * c.get(n, 0) / max(sum(c.values()), 1) for n in names]
                  for p, c in report.labels.items()}
        png = plots.grouped_bars(out / "plots" / "labels.png", names, shares, "share of rows (%)",
                                 "Label balance per file", digits=1, xlabel="label")
        doc.image("label balance", png, "plots/labels.png")

    if report.lengths:
        doc.heading(f"Token lengths ({report.model})")
        stats = {Path(p).name: length_stats(v, report.max_length) for p, v in report.lengths.items()}
        keys = ["rows", "mean", "p50", "p90", "p99", "max"] + (["truncated_share"] if report.max_length else [])
        doc.table(["file"] + keys, [[name] + [number(s.get(k)) for k in keys] for name, s in stats.items()],
                  numeric=set(range(1, len(keys) + 1)))
        png = plots.length_histogram(out / "plots" / "lengths.png", {Path(p).name: v for p, v in report.lengths.items()},
                                     report.max_length, f"Tokens per row ({report.model})")
        if png:
            doc.image("token lengths", png, "plots/lengths.png")

    found = [f for f in report.findings if f.count and f.check != "imbalance"]
    if found:
        doc.heading("Findings, row by row")
    for f in found:
        doc.heading(f"{f.check}: {Path(f.file).name} ({int(f.count):,} of {f.total:,})", 3)
        more = f" (and {len(f.rows) - LISTED:,} more in data_check.json)" if len(f.rows) > LISTED else ""
        doc.bullets(f.rows[:LISTED])
        if more:
            doc.paragraph(more.strip(" ()").capitalize() + ".")
    doc.heading("Time")
    doc.key_values([(k, f"{v:.2f} s") for k, v in report.seconds.items()])

    paths = {"md": out / "data_check.md", "html": out / "data_check.html", "json": out / "data_check.json"}
    payload = {**report.to_json(), "rules": rules, "rules_met": met, "rows_kept_per_finding": KEPT}
    for kind, text in (("md", doc.to_markdown()), ("html", doc.to_html()), ("json", json.dumps(payload, indent=2))):
        tmp = paths[kind].with_name(f".{paths[kind].name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, paths[kind])
    return paths
