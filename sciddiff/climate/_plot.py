"""Figures of a downscaling evaluation (matplotlib, Agg backend; PNGs written atomically).

- ``plot_maps``: truth, coarse input, ensemble mean, one member and the ensemble spread.
- ``plot_spectra``: radially averaged power spectra of several methods on log-log axes.
- ``plot_rank_histogram``: the rank histogram against the flat line of a calibrated ensemble.

Fields may be ``xr.DataArray`` (their coordinates label the axes) or arrays ``[H, W]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ._data import atomic_write, spatial_dims


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    plt = _pyplot()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def _edges(c: np.ndarray) -> np.ndarray:
    """Cell edges ``[n + 1]`` from centres ``[n]`` (midpoints; the ends extended by half a cell)."""
    c = np.asarray(c, dtype=np.float64)
    if c.size == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate([[2 * c[0] - mid[0]], mid, [2 * c[-1] - mid[-1]]])


def _grid(field: Any, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, str]:
    """``(values [H, W], x_edges, y_edges, x_label, y_label)`` of a 2-D field."""
    if isinstance(field, xr.DataArray):
        ydim, xdim = spatial_dims(field)
        da = field.squeeze(drop=True).transpose(ydim, xdim)
        ys = da[ydim].values if ydim in da.coords else np.arange(da.sizes[ydim])
        xs = da[xdim].values if xdim in da.coords else np.arange(da.sizes[xdim])
        return np.asarray(da.values, dtype=np.float64), _edges(xs), _edges(ys), xdim, ydim
    a = np.asarray(field, dtype=np.float64).squeeze()
    if a.ndim != 2:
        raise ValueError(f"plot_maps: panel {name!r} must be 2-D [H, W], got shape {a.shape}")
    return a, np.arange(a.shape[1] + 1) - 0.5, np.arange(a.shape[0] + 1) - 0.5, "x (cell)", "y (cell)"


def plot_maps(truth: Any, coarse: Any, mean: Any, member: Any | None, spread: Any | None,
              path: str | os.PathLike, *, units: str = "K", title: str | None = None) -> Path:
    """Five panels ``[H, W]`` (coarse ``[h, w]``): truth, coarse input, ensemble mean, one member
    (shared colour scale, the truth's 1st-99th percentile range widened to the others') and the
    spread (own scale). Any panel but the ensemble mean may be None (e.g. no truth, or a deterministic
    method): shown as "not available"."""
    plt = _pyplot()
    panels = [("truth", truth), ("coarse input", coarse), ("ensemble mean", mean), ("member", member),
              ("spread (std)", spread)]
    shown = [(n, _grid(f, n)) for n, f in panels if f is not None]
    values = np.concatenate([g[0].ravel() for n, g in shown if n != "spread (std)"])
    vmin, vmax = np.nanpercentile(values, [0.5, 99.5])
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8), constrained_layout=True)
    mesh = None
    for ax, (name, f) in zip(axes, panels, strict=True):
        ax.set_title(name)
        if f is None:
            ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        a, xe, ye, xl, yl = _grid(f, name)
        if name == "spread (std)":
            m = ax.pcolormesh(xe, ye, a, cmap="magma", shading="flat")
            fig.colorbar(m, ax=ax, label=units)
        else:
            mesh = ax.pcolormesh(xe, ye, a, cmap="RdYlBu_r", vmin=vmin, vmax=vmax, shading="flat")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes[:4].tolist(), label=units, shrink=0.9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_spectra(spectra: Mapping[str, Sequence[float] | np.ndarray], k: Sequence[float] | np.ndarray,
                 path: str | os.PathLike, *, xlabel: str = "wavenumber (cycles per grid cell)",
                 title: str | None = None) -> Path:
    """Power spectra ``{label: power [K]}`` at wavenumbers ``k [K]``, log-log; a label ``"truth"``
    is drawn black and thick."""
    plt = _pyplot()
    k = np.asarray(k, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.4, 4.6), constrained_layout=True)
    for label, p in spectra.items():
        p = np.asarray(p, dtype=np.float64)
        if p.shape != k.shape:
            raise ValueError(f"plot_spectra: spectrum {label!r} has {p.size} values for {k.size} wavenumbers")
        style = {"color": "black", "lw": 2.5} if label == "truth" else {"lw": 1.4}
        ax.loglog(k, np.clip(p, 1e-30, None), label=label, **style)
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels overlap on short decades
    ax.set_xlabel(xlabel)
    ax.set_ylabel("power")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Radially averaged power spectra")
    return _save(fig, path)


def plot_rank_histogram(counts: Sequence[int] | np.ndarray, path: str | os.PathLike, *,
                        title: str | None = None) -> Path:
    """Relative frequencies of the ``M + 1`` ranks, with the flat ``1 / (M + 1)`` line."""
    plt = _pyplot()
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size < 2 or c.sum() <= 0:
        raise ValueError(f"plot_rank_histogram: need >= 2 non-negative counts with a positive sum, got {c}")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    ax.bar(np.arange(c.size), c / c.sum(), color="tab:blue", width=0.9)
    ax.axhline(1.0 / c.size, color="black", ls="--", lw=1, label="calibrated")
    ax.set_xlabel(f"rank of the truth among {c.size - 1} members")
    ax.set_ylabel("relative frequency")
    ax.legend(fontsize=8)
    ax.set_title(title or "Rank histogram")
    return _save(fig, path)
