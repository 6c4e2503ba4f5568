"""mkdocs hooks: publish the repository's Markdown as it reads on GitHub, offline.

The guides live in docs/ and link to the examples, results and benchmarks beside it with relative links
(`../examples/beginner/lora/README.md`). mkdocs only knows docs/, so this hook
- adds README.md (the home page), examples/, benchmarks/results/, data/README.md and every repository file
  those pages link to, each at its repository path (docs/X is served as X);
- rewrites each relative link so it points where that file is served; a link to a file that does not exist
  is left alone, so `mkdocs build --strict` still fails on it;
- builds the navigation: every docs/NN-*.md guide in order (new guides join by themselves), the examples by
  level, and the other docs pages (glossary, troubleshooting, architecture, ...) as reference;
- serves KaTeX and mermaid from .venv/web (installed by `make install` with npm), so no page fetches them.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
WEB = REPO / ".venv" / "web"
EXTRA_PAGES = ["README.md", "data/README.md"]
EXTRA_TREES = ["examples", "benchmarks/results"]
VENDOR = {  # served path -> file under .venv/web
    "assets/vendor/katex/katex.min.js": "katex/dist/katex.min.js",
    "assets/vendor/katex/katex.min.css": "katex/dist/katex.min.css",
    "assets/vendor/katex/contrib/auto-render.min.js": "katex/dist/contrib/auto-render.min.js",
    "assets/vendor/mermaid/mermaid.min.js": "mermaid/dist/mermaid.min.js",
}
LINK = re.compile(r"(\]\()([^)\s#]*)(#[^)\s]*)?((?:\s+\"[^\"]*\")?\))")
FENCE = re.compile(r"^(```|~~~)")
_repo_of: dict[str, str] = {}  # served path (src_uri) -> repository path


def site_path(repo_path: str) -> str:
    return repo_path[len("docs/"):] if repo_path.startswith("docs/") else repo_path


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def on_config(config):
    guides = sorted(p for p in DOCS.glob("[0-9][0-9]-*.md"))
    reference = sorted(p for p in DOCS.glob("*.md") if not p.name[:2].isdigit() and p.name != "learning-paths.md")
    examples = {}
    for readme in sorted((REPO / "examples").glob("*/*/README.md")):
        level = readme.parent.parent.name
        examples.setdefault(level.capitalize(), []).append({_title(readme): str(readme.relative_to(REPO))})
    levels = ["Beginner", "Intermediate", "Expert"]
    examples = dict(sorted(examples.items(), key=lambda kv: levels.index(kv[0]) if kv[0] in levels else 9))
    config["nav"] = [
        {"Home": "README.md"},
        {"Learning paths": "learning-paths.md"},
        {"Guides": [{_title(p): p.name} for p in guides]},
        {"Examples": [{level: pages} for level, pages in examples.items()]},
        {"Reference": [{_title(p): p.name} for p in reference]},
    ]
    return config


def _linked_files(markdown: str, page_repo_path: str) -> set[str]:
    found = set()
    for target in _link_targets(markdown):
        resolved = _resolve(page_repo_path, target)
        if resolved and (REPO / resolved).is_file():
            found.add(resolved)
    return found


def _link_targets(markdown: str):
    in_fence = False
    for line in markdown.splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            for match in LINK.finditer(line):
                yield match.group(2)


def _resolve(page_repo_path: str, target: str) -> str | None:
    """The repository path a relative link points to (a folder with a README.md means that README)."""
    if not target or "://" in target or target.startswith(("mailto:", "/")):
        return None
    path = posixpath.normpath(posixpath.join(posixpath.dirname(page_repo_path), target))
    if path.startswith(".."):
        return None
    if (REPO / path).is_dir() and (REPO / path / "README.md").is_file():
        path = posixpath.join(path, "README.md")
    return path


def on_files(files, config):
    _repo_of.clear()
    for f in files:
        _repo_of[f.src_uri] = f"docs/{f.src_uri}"
    pages = [p for p in EXTRA_PAGES if (REPO / p).is_file()]
    for tree in EXTRA_TREES:
        pages += sorted(str(p.relative_to(REPO)) for p in (REPO / tree).rglob("*.md"))
    wanted, queue = set(pages), list(pages) + [f"docs/{f.src_uri}" for f in files.documentation_pages()]
    while queue:  # every file a published page links to, and the pages those link to
        page = queue.pop()
        for target in _linked_files((REPO / page).read_text(encoding="utf-8"), page):
            if target not in wanted and not target.startswith("docs/"):
                wanted.add(target)
                if target.endswith(".md"):
                    queue.append(target)
    for repo_path in sorted(wanted):
        files.append(File(repo_path, str(REPO), config["site_dir"], config["use_directory_urls"]))
        _repo_of[repo_path] = repo_path
    fonts = {f"assets/vendor/katex/fonts/{p.name}": f"katex/dist/fonts/{p.name}"
             for p in sorted((WEB / "katex" / "dist" / "fonts").glob("*.woff2"))}  # what katex.min.css loads
    for served, source in {**VENDOR, **fonts}.items():
        if not (WEB / source).is_file():
            raise PluginError(f"{WEB / source} is missing: run `make install` (it installs KaTeX and mermaid there)")
        files.append(File(served, str(WEB.parent / "web-served"), config["site_dir"], config["use_directory_urls"]))
        files.get_file_from_path(served).abs_src_path = str(WEB / source)
    return files


def on_page_markdown(markdown, page, config, files):
    page_repo = _repo_of.get(page.file.src_uri, f"docs/{page.file.src_uri}")
    page_site = page.file.src_uri

    def rewrite(match: re.Match) -> str:
        target = _resolve(page_repo, match.group(2))
        if target is None or not (REPO / target).is_file():
            return match.group(0)
        new = posixpath.relpath(site_path(target), posixpath.dirname(page_site) or ".")
        return f"{match.group(1)}{new}{match.group(3) or ''}{match.group(4)}"

    out, in_fence = [], False
    for line in markdown.splitlines(keepends=True):
        if FENCE.match(line.strip()):
            in_fence = not in_fence
        out.append(line if in_fence else LINK.sub(rewrite, line))
    return "".join(out)
