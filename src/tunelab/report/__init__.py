"""Reports with plots: one run (report.md/.html in its directory) or several methods side by side.

    write_run_report(run_dir) -> (md_path, html_path)
    report_after_run(run_dir, console) -> html_path or None (a failure is printed, not raised)
    write_compare_report(compare_dir, entries) -> {"md", "html", "csv", "json", "<name>_plot": path, ...}

The HTML files are self-contained (plots embedded as base64 PNG, inline CSS, no scripts), so they open
offline and can be shared as one file.
"""

from tunelab.report.compare_report import write_compare_report
from tunelab.report.run_report import report_after_run, write_run_report

__all__ = ["report_after_run", "write_compare_report", "write_run_report"]
