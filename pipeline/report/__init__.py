"""What a user reads: report.md and report.html, the plots (learning curves, confusion), and the
parent run's description.
"""

from pipeline.report._html import write_html
from pipeline.report._markdown import Outcome, markdown_lines, table, write_markdown
from pipeline.report._parent_summary import summarise_parent
from pipeline.report._plots import confusion_plot, write_plots
from pipeline.report._test_tables import write_test_tables

__all__ = [
    "Outcome",
    "confusion_plot",
    "markdown_lines",
    "summarise_parent",
    "table",
    "write_html",
    "write_markdown",
    "write_plots",
    "write_test_tables",
]
