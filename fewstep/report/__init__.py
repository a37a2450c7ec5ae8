"""The demo report (``runs/<profile>/report.md``): see ``markdown.write_report``."""

from fewstep.report.markdown import build_report, render_markdown, write_report

__all__ = ["build_report", "render_markdown", "write_report"]
