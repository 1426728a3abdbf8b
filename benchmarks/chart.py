"""Draw docs/benchmarks.png from the medians ``run.py`` hands over.

Run by ``run.py`` in its tools environment (matplotlib):
``python chart.py chart.json out.png``. One panel per transport and mode,
grouped bars per body, one bar per environment, log scale.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List

import matplotlib  # type: ignore[import-not-found, unused-ignore]

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]  # noqa: E402

COLOURS = {"A": "#b0b0b0", "B": "#1f77b4", "C": "#ff7f0e"}


def main(argv: List[str]) -> int:
    data: Dict[str, Any] = json.loads(open(argv[1]).read())
    rows: List[Dict[str, Any]] = data["rows"]
    labels: Dict[str, str] = data["labels"]
    panels = [
        (t, m)
        for t in ("http", "tls")
        for m in ("sequential", "concurrent")
        if any(r["transport"] == t and r["mode"] == m for r in rows)
    ]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False
    )
    for ax, (transport, mode) in zip(axes[:, 0], panels):
        panel = [r for r in rows if r["transport"] == transport and r["mode"] == mode]
        width = 0.8 / len(labels)
        for i, key in enumerate(labels):
            xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(panel))]
            ys = [r["rps"][key] for r in panel]
            bars = ax.bar(xs, ys, width, label=labels[key], color=COLOURS.get(key))
            for bar, y in zip(bars, ys):
                ax.annotate(
                    f"{y:,.0f}" if y >= 100 else f"{y:.1f}",
                    (bar.get_x() + bar.get_width() / 2, y),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
        ax.set_yscale("log")
        ax.set_xticks(range(len(panel)))
        ax.set_xticklabels([r["body"] for r in panel], fontsize=9)
        ax.set_ylabel("requests/s (log)")
        name = "HTTP" if transport == "http" else "TLS"
        extra = " (64 tasks, 16 connections)" if mode == "concurrent" else ""
        ax.set_title(f"{name}, {mode}{extra}", fontsize=10, loc="left")
        ax.grid(axis="y", which="major", alpha=0.3)
        top = max(max(r["rps"].values()) for r in panel)
        ax.set_ylim(top=top * 4)
    axes[0, 0].legend(loc="upper right", fontsize=9, ncol=len(labels))
    fig.suptitle(data.get("title", "requests/s"), fontsize=11)
    fig.tight_layout()
    fig.savefig(argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
