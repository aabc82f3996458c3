"""``metrics.jsonl``: one JSON object per line, appended and flushed as training goes.

Rows have ``"kind"``: ``"train"`` (means over a log interval), ``"eval"`` (the task's
first evaluation split, validation where there is one, at the trained step limit),
``"budget"`` (that split at a fixed forward step budget) or ``"final"`` (each other split,
e.g. the test set, once at the end); every evaluation row names its ``"split"``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


def _clean(value):
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null means "not measured at this step"
    return value


class MetricsWriter:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
            fh.flush()

    def truncate_after(self, step: int) -> None:
        """Drops rows of steps after ``step`` (and a torn last line), atomically: for resuming."""
        if not self.path.exists():
            return
        kept = [row for row in read(self.path) if row["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(tmp, self.path)


def read(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics file; a torn last line (killed mid-write) is skipped."""
    rows = []
    with open(path) as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
