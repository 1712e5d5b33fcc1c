"""Recipe: ERA5 hourly 2 m temperature over the UK, March 2019 -> x4 downscaling splits.

Source: ``era5-2mt-2019-03-uk.grib`` of github pydata/xarray-data (ERA5 reanalysis, ECMWF,
Copernicus licence), 744 x 33 x 49 (time, lat, lon) at 0.25 degrees, 58N..50N x 10W..2E, in K. The
offline copy is its NetCDF conversion (unchanged values) ``era5_t2m_uk_2019-03_0p25deg.nc`` under
``$SCIDDIFF_DATA/climate`` (default ``../shared/data/climate`` beside the repository).

Steps (``sciddiff.climate._data``): load and check the file (dims, units K, no missing values);
crop the fine grid to 32 x 48 from the north-west corner (drops the row 50.00N and the column
2.00E); coarse = 4 x 4 block mean (8 x 12); split by whole days: train 1-21, valid 22-24, test
25-31 March; normalisation statistics from the fine training field.

Outputs in ``--out`` (each written atomically): ``era5_uk_x{f}_{train,valid,test}.nc`` holding
``t2m [time, lat, lon]`` and ``t2m_coarse [time, lat_coarse, lon_coarse]``, ``normalizer.json`` and
``provenance.json`` (source file and its SHA-256, the GRIB's MD5 when present, crop, factor, splits,
sizes, versions, date).

Usage::

    python data_recipes/era5_uk.py --out data/era5_uk            # from the offline copy
    python data_recipes/era5_uk.py --out data/era5_uk --download # fetch the GRIB (needs cfgrib)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
import urllib.request
from pathlib import Path

import xarray as xr

from sciddiff.climate._data import (
    ERA5_UK_DAYS,
    ERA5_UK_FILE,
    ERA5_UK_ORIGIN,
    atomic_write,
    atomic_write_text,
    data_root,
    era5_uk_splits,
    load_era5_uk,
)

GRIB_URL = "https://github.com/pydata/xarray-data/raw/master/era5-2mt-2019-03-uk.grib"
GRIB_MD5 = "eae4f0d198f4f6c16ba950975a217155"
CROP = (32, 48)


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_grib(folder: Path) -> Path:
    """Fetch the GRIB into ``folder`` (atomically) and check its MD5; clear errors offline."""
    target = folder / "era5-2mt-2019-03-uk.grib"
    if not target.exists():
        try:
            with urllib.request.urlopen(GRIB_URL, timeout=60) as r:
                payload = r.read()
        except OSError as err:
            raise SystemExit(f"cannot download {GRIB_URL} ({err}); without a network, place the file "
                             f"(or its NetCDF conversion {ERA5_UK_FILE}) locally and pass --source") from err
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(payload))
    md5 = _digest(target, "md5")
    if md5 != GRIB_MD5:
        raise SystemExit(f"{target}: md5 {md5} differs from the published {GRIB_MD5}; delete it and retry")
    return target


def build(out: Path, source: Path | None = None, factor: int = 4) -> dict:
    """Write the splits, the normaliser and the provenance record into ``out``; returns the record."""
    source = source or data_root() / "climate" / ERA5_UK_FILE
    ds = load_era5_uk(source)
    splits = era5_uk_splits(ds, factor=factor, crop=CROP)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ("train", "valid", "test"):
        pair = getattr(splits, name)
        coarse = pair.coarse.rename({"lat": "lat_coarse", "lon": "lon_coarse"})
        part = xr.Dataset({"t2m": pair.fine, "t2m_coarse": coarse},
                          attrs={**ds.attrs, "sciddiff_recipe": "data_recipes/era5_uk.py",
                                 "sciddiff_split": name, "sciddiff_note": splits.note})
        path = out / f"era5_uk_x{factor}_{name}.nc"
        atomic_write(path, lambda tmp, part=part: part.to_netcdf(tmp))
        files[name] = {"file": path.name, "times": int(pair.fine.sizes["time"]),
                       "fine": list(pair.fine.shape), "coarse": list(pair.coarse.shape)}
    splits.normalizer().save(out / "normalizer.json")
    grib = source.with_name("era5-2mt-2019-03-uk.grib")
    from importlib.metadata import version

    record = {
        "recipe": "data_recipes/era5_uk.py",
        "origin": ERA5_UK_ORIGIN,
        "source": {"path": str(source), "sha256": _digest(source, "sha256")},
        "grib_md5": _digest(grib, "md5") if grib.exists() else None,
        "crop": {"rows": [0, CROP[0] - 1], "cols": [0, CROP[1] - 1], "corner": "north-west"},
        "factor": factor, "coarsening": "block mean", "split_days_march_2019": ERA5_UK_DAYS,
        "splits": files, "normalizer": "normalizer.json",
        "versions": {p: version(p) for p in ("sciddiff", "xarray", "numpy")},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / "provenance.json", json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="ERA5 UK t2m (March 2019) -> x4 downscaling splits")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--source", type=Path, help=f"NetCDF {ERA5_UK_FILE} or the GRIB (GRIB needs cfgrib)")
    p.add_argument("--download", action="store_true", help="fetch the GRIB from pydata/xarray-data first")
    p.add_argument("--factor", type=int, default=4, choices=(2, 4, 8, 16))
    a = p.parse_args(argv)
    source = download_grib(a.out / "raw") if a.download else a.source
    try:
        record = build(a.out, source, a.factor)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(record["splits"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
