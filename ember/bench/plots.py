"""PNG charts of benchmark reports (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_chart(report: dict[str, Any], path: str | Path) -> None:
    """Bars of output tok/s per engine, labelled with the value and the ratio to the slowest."""
    plt = _pyplot()
    results = report["results"]
    names = [f"{r['name']}\n{r['dtype']}" for r in results]
    values = [r["output_tps"] for r in results]
    fig, ax = plt.subplots(figsize=(1.6 * len(values) + 2, 4))
    bars = ax.bar(names, values, color=["#d9480f" if r["name"].startswith("ember") else "#868e96" for r in results])
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    w = report["workload"]
    ax.set_ylabel("output tokens / s")
    ax.set_title(
        f"{w['name']}: {w['requests']} requests, {w['output_tokens']} output tokens\n{report['date'][:10]}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_chart(report: dict[str, Any], path: str | Path) -> None:
    """TTFT, TPOT and ITL (p50 and p99) at each load level: concurrent clients, or request rates."""
    plt = _pyplot()
    levels = report["levels"]
    by_rate = levels[0].get("concurrency") is None
    loads = [str(level["request_rate"] if by_rate else level["concurrency"]) for level in levels]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("ttft_s", "tpot_s", "itl_s"), ("TTFT", "TPOT", "ITL"), strict=True):
        for pct, style in (("p50", "-o"), ("p99", "--o")):
            ax.plot(range(len(levels)), [level[key][pct] * 1000 for level in levels], style, label=pct)
        ax.set_xticks(range(len(levels)), loads)
        ax.set_xlabel("request rate (req/s)" if by_rate else "concurrent clients")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"serving latency ({report['workload']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
