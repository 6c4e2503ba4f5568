"""The docs site builds with no broken link or anchor, and a rendered guide shows its figure, formulas and
diagram in a real browser without fetching anything from the network.

The browser is Debian's chromium (`make install` installs it), driven by Playwright for Python; Playwright's own
browser download is never used. TUNELAB_SITE_SCREENSHOT=PATH also saves the page's screenshot there (the
committed one is docs/figures/site-guide-03.png).
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_site_builds_strict_with_every_guide_and_reference_page(site):
    for page in ("index.html", "learning-paths/index.html", "glossary/index.html", "troubleshooting/index.html",
                 "examples/beginner/lora/index.html"):
        assert (site / page).is_file(), page
    guides = sorted(p.stem for p in (REPO / "docs").glob("[0-9][0-9]-*.md"))
    assert guides and all((site / g / "index.html").is_file() for g in guides)
    assert "katex.min.js" in (site / "01-introduction" / "index.html").read_text()


def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _loaded_images(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('article img')]"
                         ".filter(i => i.complete && i.naturalWidth > 0).map(i => i.getAttribute('src'))")


def test_guides_render_figures_formulas_and_diagrams_offline(site):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian's chromium is missing: run `make install`"
    server = _serve(site)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    outside: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})

            def only_local(route):
                if route.request.url.startswith(base):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            page.route("**/*", only_local)
            # Guide 03: the LoRA formula typeset by KaTeX, and its figure.
            page.goto(f"{base}/03-lora/", wait_until="networkidle")
            page.wait_for_selector(".arithmatex .katex", timeout=30_000)
            lora_formulas = page.locator(".arithmatex .katex").count()
            lora_images = _loaded_images(page)
            shot = os.environ.get("TUNELAB_SITE_SCREENSHOT")
            if shot:
                page.locator("#the-idea-in-one-equation").scroll_into_view_if_needed()
                page.evaluate("() => window.scrollBy(0, -70)")  # below the sticky header
                page.screenshot(path=shot)
            # Guide 01: the AdamW formulas, the overfitting plot, and the mermaid diagrams. Material draws each
            # diagram into a closed shadow root of div.mermaid, so the drawn SVG shows as the div's height.
            page.goto(f"{base}/01-introduction/", wait_until="networkidle")
            page.wait_for_selector(".arithmatex .katex", timeout=30_000)
            page.wait_for_function("() => [...document.querySelectorAll('div.mermaid')]"
                                   ".some(d => d.getBoundingClientRect().height > 40)", timeout=30_000)
            intro_formulas = page.locator(".arithmatex .katex").count()
            intro_images = _loaded_images(page)
            diagrams = page.evaluate("() => [...document.querySelectorAll('div.mermaid')]"
                                     ".filter(d => d.getBoundingClientRect().height > 40).length")
            browser.close()
    finally:
        server.shutdown()
    assert lora_formulas >= 3 and intro_formulas >= 3, "formulas were not typeset by KaTeX"
    assert any(src.endswith("figures/lora.png") for src in lora_images), lora_images
    assert any("overfit" in src for src in intro_images), f"the overfitting plot did not load: {intro_images}"
    assert diagrams >= 2, "the mermaid diagrams were not drawn"
    assert outside == [], f"a page fetched from outside the site: {outside}"
