"""A report as a list of blocks, rendered twice: Markdown (plots linked as files) and self-contained HTML.

Building the content once and rendering it twice keeps report.md and report.html saying the same thing.
The HTML embeds each PNG as a base64 data URI and carries its CSS inline, so the one file can be mailed,
attached to a ticket or opened offline; it has no scripts and fetches nothing.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .8em 0; }
th, td { border: 1px solid #ddd; padding: .3em .6em; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: .8em 0; }
pre { background: #f7f7f7; padding: .6em; white-space: pre-wrap; word-break: break-word; margin: 0; }
.side { display: grid; gap: .8em; margin: .6em 0 1.4em; }
.side h4 { margin: .2em 0; }
"""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # column indexes to right-align


@dataclass
class Image:
    alt: str
    path: Path  # the PNG on disk
    link: str  # its path relative to the Markdown file


@dataclass
class SideBySide:
    """Texts shown in columns in HTML and one after another in Markdown (e.g. tuned vs untuned output)."""

    columns: list[tuple[str, str]]  # (title, text)


class Document:
    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple[str, object]] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", items))

    def table(self, headers: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> None:
        if rows:
            self.blocks.append(("table", Table(headers, rows, numeric or set())))

    def key_values(self, pairs: list[tuple[str, str]], numeric: bool = True) -> None:
        self.table(["", "value"], [[k, v] for k, v in pairs], numeric={1} if numeric else set())

    def image(self, alt: str, path: Path, link: str) -> None:
        self.blocks.append(("image", Image(alt, path, link)))

    def preformatted(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def side_by_side(self, columns: list[tuple[str, str]]) -> None:
        self.blocks.append(("side", SideBySide(columns)))

    # ----------------------------------------------------------------- Markdown

    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, block in self.blocks:
            if kind == "heading":
                level, text = block
                out += ["#" * level + " " + text, ""]
            elif kind == "paragraph":
                out += [block, ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in block] + [""]
            elif kind == "table":
                out += _markdown_table(block) + [""]
            elif kind == "image":
                out += [f"![{block.alt}]({block.link})", ""]
            elif kind == "pre":
                out += [_fence(block), ""]
            elif kind == "side":
                for title, text in block.columns:
                    out += [f"**{title}**", "", _fence(text), ""]
        return "\n".join(out).rstrip() + "\n"

    # ----------------------------------------------------------------- HTML

    def to_html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for kind, block in self.blocks:
            if kind == "heading":
                level, text = block
                body.append(f"<h{level}>{e(text)}</h{level}>")
            elif kind == "paragraph":
                body.append(f"<p>{e(block)}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block) + "</ul>")
            elif kind == "table":
                body.append(_html_table(block))
            elif kind == "image":
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                body.append(f'<img alt="{e(block.alt)}" src="data:image/png;base64,{data}">')
            elif kind == "pre":
                body.append(f"<pre>{e(block)}</pre>")
            elif kind == "side":
                cols = len(block.columns)
                cells = "".join(f"<div><h4>{e(t)}</h4><pre>{e(x)}</pre></div>" for t, x in block.columns)
                body.append(f'<div class="side" style="grid-template-columns: repeat({cols}, 1fr)">{cells}</div>')
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{e(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body)
            + "\n</body>\n</html>\n"
        )


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _markdown_table(table: Table) -> list[str]:
    align = ["---:" if i in table.numeric else "---" for i in range(len(table.headers))]
    lines = ["| " + " | ".join(_markdown_cell(h) for h in table.headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in table.rows]
    return lines


def _html_table(table: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in table.headers)
    rows = []
    for row in table.rows:
        cells = "".join(
            f'<td class="num">{e(c)}</td>' if i in table.numeric else f"<td>{e(c)}</td>" for i, c in enumerate(row)
        )
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _fence(text: str) -> str:
    """A fenced block longer than any backtick run inside text, so model output cannot close it early."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"
