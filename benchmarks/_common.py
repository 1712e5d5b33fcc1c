"""Helpers shared by the benchmarks: hardware and version lines, timing, formatting."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Iterable

import torch

LIBRARIES = ("sciddiff", "diffusers")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def hardware_line() -> str:
    """One Markdown line: CPU, cores, torch threads, library versions, date."""
    parts = [
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()})",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
    ]
    for pkg in ("diffusers", "sciddiff"):
        v = package_version(pkg)
        parts.append(f"{pkg} {v}" if v else f"{pkg} not installed")
    parts.append(f"date {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}")
    return "; ".join(parts)


class CallTimer:
    """Counts calls and the wall time spent inside them (``time.perf_counter``)."""

    __slots__ = ("calls", "seconds")

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0

    def reset(self) -> None:
        self.calls = 0
        self.seconds = 0.0

    def add(self, started: float) -> None:
        self.calls += 1
        self.seconds += time.perf_counter() - started


def median(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a Markdown table (``-`` for missing)."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def md_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table; ``align`` entries are ``"l"`` or ``"r"``."""
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
