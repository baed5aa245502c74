"""Training curves: per-step and per-evaluation rows written as CSV and plotted to one PNG.

The rows live in the training state (saved with every checkpoint), so a resumed run writes the whole
curve, not just the part after the resume.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> bool:
    """Loss against step (left) and recall against step (right). False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    # A bare Figure needs no pyplot backend, so plotting never changes the caller's (e.g. a notebook's).
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    if steps:
        left.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    left.set(xlabel="optimizer step", ylabel="InfoNCE loss", title="training loss")
    for key in ("t2i_R@1", "t2i_R@10", "i2t_R@1", "i2t_R@10"):
        if evals:
            right.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key)
    right.set(xlabel="optimizer step", ylabel="recall (%)", title="evaluation recall")
    if evals:
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True
