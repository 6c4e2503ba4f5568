"""The MLflow screenshots in docs/11-mlops.md: the runs page (and the registered model) of an embedded store,
taken in Debian's chromium through Playwright.

    python docs/tools/screenshot_mlflow.py --dir examples/expert/mlops/runs --out docs/images
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunelab.track.tracking import open_client
from tunelab.track.ui import running_ui

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="Run folder holding mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--experiment", default="tunelab")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    client = open_client(f"sqlite:///{(args.dir / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name(args.experiment).experiment_id
    models = [m.name for m in client.search_registered_models()]
    args.out.mkdir(parents=True, exist_ok=True)
    with running_ui(args.dir) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 700})
        run_names = [r.info.run_name for r in client.search_runs([experiment], max_results=5)]
        page.goto(f"{url}/#/experiments/{experiment}/runs", wait_until="domcontentloaded")
        page.get_by_text(run_names[0]).first.wait_for(timeout=180_000)  # the React app renders after its data arrives
        page.wait_for_timeout(2000)
        page.screenshot(path=str(args.out / "mlflow-runs.png"))
        if models:
            page.goto(f"{url}/#/models/{models[0]}", wait_until="domcontentloaded")
            page.get_by_text("Version 1").first.wait_for(timeout=180_000)
            page.wait_for_timeout(2000)
            page.screenshot(path=str(args.out / "mlflow-model.png"))
        browser.close()
    print(f"wrote {args.out / 'mlflow-runs.png'}" + (f" and {args.out / 'mlflow-model.png'}" if models else ""))


if __name__ == "__main__":
    main()
