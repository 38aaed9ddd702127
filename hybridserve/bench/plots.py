"""Sweep plots (matplotlib, Agg): the throughput/latency frontier and TTFT against the load setting.

Each PNG also carries the plotted series as JSON in its `Description` text chunk, so a reader
(or a test) can check the picture shows exactly the numbers in the sweep's CSV.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

AXIS_LABELS = {"concurrency": "max concurrency (requests)", "request_rate": "request rate (req/s)"}


def frontier_series(rows: list[dict], axis: str) -> dict:
    """Output throughput against median TPOT, one point per successful setting."""
    ok = [r for r in rows if r["completed"]]
    return {
        "setting": [r[axis] for r in ok],
        "median_tpot_ms": [r["median_tpot_ms"] for r in ok],
        "output_throughput": [r["output_throughput"] for r in ok],
    }


def ttft_series(rows: list[dict], axis: str) -> dict:
    """Median (and P99, when measured) TTFT against the swept setting."""
    ok = [r for r in rows if r["completed"]]
    series = {"setting": [r[axis] for r in ok], "median_ttft_ms": [r["median_ttft_ms"] for r in ok]}
    if all(r.get("p99_ttft_ms") not in (None, "") for r in ok):
        series["p99_ttft_ms"] = [r["p99_ttft_ms"] for r in ok]
    return series


def frontier_figure(series: dict, axis: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot(series["median_tpot_ms"], series["output_throughput"], marker="o", label="output tok/s")
    for x, y, setting in zip(series["median_tpot_ms"], series["output_throughput"], series["setting"]):
        ax.annotate(f"{setting:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("median TPOT (ms)")
    ax.set_ylabel("output throughput (tok/s)")
    ax.set_title(f"Throughput / latency frontier (points labelled by {axis})")
    ax.grid(True, alpha=0.3)
    return fig


def ttft_figure(series: dict, axis: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 5))
    for key, label in (("median_ttft_ms", "median TTFT"), ("p99_ttft_ms", "P99 TTFT")):
        if key in series:
            ax.plot(series["setting"], series[key], marker="o", label=label)
    settings = [s for s in series["setting"] if s > 0]
    if settings and max(settings) / min(settings) >= 8:
        ax.set_xscale("log", base=2)
    elif axis == "concurrency":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(AXIS_LABELS[axis])
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"Time to first token vs {axis}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def save_png(fig: Figure, path: Path, series: dict) -> None:
    fig.savefig(path, format="png", dpi=100, metadata={"Description": json.dumps(series)})
    plt.close(fig)


def write_sweep_plots(rows: list[dict], axis: str, out_dir: Path) -> list[Path]:
    """Write both PNGs; returns their paths (none if no setting succeeded)."""
    if not any(r["completed"] for r in rows):
        return []
    frontier, ttft = frontier_series(rows, axis), ttft_series(rows, axis)
    paths = [out_dir / "throughput_vs_tpot.png", out_dir / f"ttft_vs_{axis}.png"]
    save_png(frontier_figure(frontier, axis), paths[0], frontier)
    save_png(ttft_figure(ttft, axis), paths[1], ttft)
    return paths
