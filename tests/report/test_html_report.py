"""report.html: report.md rendered as one page that needs no file beside it."""

from __future__ import annotations

import base64
import re

from pipeline.report import write_html

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def test_html_embeds_the_reports_images_and_renders_its_tables(tmp_path):
    (tmp_path / "learning_curves.png").write_bytes(PNG)
    md = tmp_path / "report.md"
    md.write_text(
        "# Study report: tiny\n\nMetric: `val_accuracy` (maximize)\n\n"
        "| number | state |\n|---:|:---|\n| 1 | COMPLETE |\n| 2 | PRUNED |\n\n"
        "![learning_curves](learning_curves.png)\n\n![gone](missing.png)\n\n<script>alert(1)</script>\n",
        encoding="utf-8",
    )
    path = write_html(md)
    html = path.read_text(encoding="utf-8")
    assert path == tmp_path / "report.html"
    assert "<title>Study report: tiny</title>" in html and "<h1>Study report: tiny</h1>" in html
    rows = re.findall(r"<tr>\s*<td[^>]*>(\d)</td>\s*<td[^>]*>(\w+)</td>\s*</tr>", html)
    assert rows == [("1", "COMPLETE"), ("2", "PRUNED")]
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="learning_curves"', html)
    assert [base64.b64decode(e) for e in embedded] == [PNG]
    assert '<img src="missing.png" alt="gone"' in html  # not in the folder: left as written
    assert "<script>" not in html  # raw HTML in the Markdown is escaped, never run
