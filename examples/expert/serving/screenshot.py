"""Take docs/img/playground.png: the playground page of a running server, chatting with the assistant.

    .venv/bin/python examples/expert/serving/screenshot.py --url http://127.0.0.1:8000
Needs Debian's chromium (apt-get install chromium); Playwright drives it (no browser download).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
OUT = Path(__file__).resolve().parents[3] / "docs" / "img" / "playground.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", default="")
    args = ap.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        page.goto(args.url + "/")
        if args.key:
            page.fill("#key", args.key)
            page.dispatch_event("#key", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.select_option("#model", "assistant")
        page.fill("#maxtokens", "64")
        page.fill("#prompt", "Give me one tip for writing clear emails.")
        page.click("#send")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=300_000)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(OUT))
        browser.close()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
