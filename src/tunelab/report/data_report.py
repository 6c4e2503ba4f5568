"""The report of `tunelab data check`: data_check.md, a self-contained data_check.html and plots/, plus
data_check.json with every finding (up to 200 rows each)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunelab.report import plots
from tunelab.report.document import Document
from tunelab.report.units import number

LISTED = 50  # rows listed per finding in the HTML/Markdown report


def write_data_report(payload: dict, lengths: dict[str, list[int]], out_dir: str | Path) -> dict[str, Path]:
    """payload: data/quality.py's QualityReport.to_json() plus rules, rules_met and summary (its summary_rows);
    lengths: each file's token lengths, for the histogram."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = Document("Data check")
    rules, met = payload["rules"], payload["rules_met"]
    files = ", ".join(f"{f['path']} ({f['role']}, {f['kind']}, {f['rows']:,} rows)" for f in payload["files"])
    doc.paragraph(f"Files: {files}.")
    if rules:
        doc.paragraph(f"Rules: {', '.join(rules)}. " + (f"Met: {'; '.join(met)}." if met else "None was met."))
    doc.heading("Summary")
    doc.table(["check", "looks for", "found"], payload["summary"])

    labels = payload["labels"]
    if labels:
        doc.heading("Labels")
        names = sorted({name for counts in labels.values() for name in counts})
        doc.table(["label"] + [Path(p).name for p in labels],
                  [[name] + [number(counts.get(name, 0)) for counts in labels.values()] for name in names],
                  numeric=set(range(1, len(labels) + 1)))
        shares = {Path(p).name: [100 * c.get(n, 0) / max(sum(c.values()), 1) for n in names]
                  for p, c in labels.items()}
        png = plots.grouped_bars(out / "plots" / "labels.png", names, shares, "share of rows (%)",
                                 "Label balance per file", digits=1, xlabel="label")
        doc.image("label balance", png, "plots/labels.png")

    if lengths:
        model, max_length = payload["model"], payload["max_length"]
        doc.heading(f"Token lengths ({model})")
        stats = {Path(p).name: s for p, s in payload["token_lengths"].items()}
        keys = ["rows", "mean", "p50", "p90", "p99", "max"] + (["truncated_share"] if max_length else [])
        doc.table(["file"] + keys, [[name] + [number(s.get(k)) for k in keys] for name, s in stats.items()],
                  numeric=set(range(1, len(keys) + 1)))
        png = plots.length_histogram(out / "plots" / "lengths.png", {Path(p).name: v for p, v in lengths.items()},
                                     max_length, f"Tokens per row ({model})")
        if png:
            doc.image("token lengths", png, "plots/lengths.png")

    found = [f for f in payload["findings"] if f["count"] and f["check"] != "imbalance"]
    if found:
        doc.heading("Findings, row by row")
    for f in found:
        doc.heading(f"{f['check']}: {Path(f['file']).name} ({int(f['count']):,} of {f['total']:,})", 3)
        doc.bullets(f["rows"][:LISTED])
        if f["count"] > LISTED:
            doc.paragraph(f"And {int(f['count']) - LISTED:,} more (data_check.json keeps the first {len(f['rows'])}).")
    doc.heading("Time")
    doc.key_values([(k, f"{v:.2f} s") for k, v in payload["seconds"].items()])

    paths = {"md": out / "data_check.md", "html": out / "data_check.html", "json": out / "data_check.json"}
    for kind, text in (("md", doc.to_markdown()), ("html", doc.to_html()), ("json", json.dumps(payload, indent=2))):
        tmp = paths[kind].with_name(f".{paths[kind].name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, paths[kind])
    return paths
