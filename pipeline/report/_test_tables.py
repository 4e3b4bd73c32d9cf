"""The sealed test's per-class figures at any class count: whole tables up to `COMPACT_CLASSES`,
a compact view beyond.

A K x K matrix in Markdown or as an annotated plot grows with K squared: at 200 classes the full
matrix made a 1 MB report.md and a 13464 x 13442 px PNG that Pillow refuses to open. Beyond
`COMPACT_CLASSES` the report shows the `SHOWN_ROWS` classes with the lowest recall and the
`SHOWN_ROWS` most confused pairs; the whole figures are always in `per_class.csv` and
`confusion_matrix.csv` beside it (and in the parent run's artifacts).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.champion import TestEvaluation

COMPACT_CLASSES = 30  # beyond this, a 30 x 30 Markdown table no longer fits a screen
SHOWN_ROWS = 20  # rows of each compact table


def is_compact(evaluation: TestEvaluation) -> bool:
    """True when the report shows the compact view (more than `COMPACT_CLASSES` classes)."""
    return len(evaluation.classes) > COMPACT_CLASSES


def lowest_recall(evaluation: TestEvaluation, top: int = SHOWN_ROWS) -> pd.DataFrame:
    """`per_class()` rows of the `top` classes with the lowest recall (ties: class index order)."""
    return evaluation.per_class().sort_values("recall", kind="stable").head(top)


def write_test_tables(evaluation: TestEvaluation, folder: Path) -> list[Path]:
    """Write `per_class.csv` (class, precision, recall, f1, support) and `confusion_matrix.csv`
    (rows `true <class>`, columns `pred <class>`, counts) into `folder`; returns their paths.

    Raises:
        OSError: a file cannot be written.
    """
    per_class, matrix = folder / "per_class.csv", folder / "confusion_matrix.csv"
    evaluation.per_class().to_csv(per_class, index=False)
    evaluation.confusion_frame().to_csv(matrix)
    return [per_class, matrix]
