"""OUT/metrics.jsonl (one JSON object per optimizer step) and OUT/loss.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TextIO

from rwkvslice.train.checkpoint import atomic_write_text


def read_metrics(path: str | Path) -> list[dict]:
    """Parsed records of a metrics file; a torn last line (process killed mid-write) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


class MetricsLog:
    """Appends one line per step and flushes it (a SIGKILL loses at most the line being written).

    `start(keep_up_to)` makes the file consistent with the step a run starts from: records after that
    step (written by a killed run after its last checkpoint) are removed, so a resumed run rewrites them
    and the file reads as if the run had never been interrupted.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f: TextIO | None = None

    def start(self, keep_up_to: int) -> None:
        kept = [r for r in read_metrics(self.path) if int(r["step"]) <= keep_up_to]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        assert self._f is not None, "call start() first"
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def plot_loss(metrics_path: str | Path, png_path: str | Path) -> str:
    """Draw loss against step into `png_path`. Returns a one-line note of what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; skipped loss.png (pip install 'rwkvslice[plot]')"
    all_records = read_metrics(metrics_path)
    records = [r for r in all_records if _finite(r.get("loss"))]
    if not records:
        return "no finite losses to plot; skipped loss.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1, label="train")
    held_out = [r for r in all_records if _finite(r.get("eval_loss"))]  # --eval-data
    if held_out:
        ax.plot([r["step"] for r in held_out], [r["eval_loss"] for r in held_out], "o-", ms=3, lw=1,
                label="held-out (--eval-data)")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean CE over kept tokens)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return f"wrote {png_path}"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
