"""The xarray front end: downscale (coordinates, attrs, dims, units, NaNs), the accessor, NetCDF/Zarr."""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as dsa
import numpy as np
import pytest
import torch
import xarray as xr

from sciddiff.climate._xarray import (
    downscale,
    downscale_file,
    fine_coordinate,
    grid_dims,
    read_dataset,
    sample_seed,
    write_dataset,
)

ERA5 = Path("/work/shared/data/climate/era5_t2m_uk_2019-03_0p25deg.nc")


class StandIn(torch.nn.Module):
    """A tiny model with the ``Downscaler.predict`` interface: nearest-neighbour upsampling, plus
    ``static_weight *`` the first static channel, plus member-dependent noise (diffusion mode)."""

    name = "stand-in"

    def __init__(self, factor=4, variables=("t2m",), units=("K",), static_weight=0.0, noise=0.1):
        super().__init__()
        self.factor, self.variables, self.units = factor, variables, units
        self.static_weight, self.noise, self.calls = static_weight, noise, []

    def static_features(self, lat, lon):
        return torch.stack([torch.sin(torch.deg2rad(lat))[:, None].expand(-1, lon.numel()),
                            torch.cos(torch.deg2rad(lon))[None, :].expand(lat.numel(), -1)])

    def predict(self, coarse, static=None, *, members=16, mode="diffusion", sampler=None, nfe=None,
                generator=None, conserve=False):
        self.calls.append({"shape": tuple(coarse.shape), "sampler": sampler, "nfe": nfe,
                           "static": None if static is None else tuple(static.shape)})
        f = self.factor
        up = coarse.repeat_interleave(f, -2).repeat_interleave(f, -1)
        if static is not None:
            up = up + self.static_weight * static[:, :1]
        if mode == "regression":
            return up[:, None]
        eps = torch.randn(coarse.shape[0], members, *up.shape[1:], generator=generator, dtype=up.dtype)
        return up[:, None] + self.noise * eps


def grid(ny=6, nx=8, times=3, *, dims=("lat", "lon"), units="K", name="t2m", seed=0):
    """A coarse field with CF attrs, descending latitudes and a time dim."""
    rng = np.random.default_rng(seed)
    y = np.linspace(58.0, 58.0 - (ny - 1), ny)
    x = np.linspace(-10.0, -10.0 + (nx - 1), nx)
    data = (280 + rng.normal(size=(times, ny, nx))).astype("float32")
    return xr.DataArray(
        data, dims=("time", *dims), name=name,
        coords={"time": np.arange(times), dims[0]: (dims[0], y, {"units": "degrees_north", "axis": "Y"}),
                dims[1]: (dims[1], x, {"units": "degrees_east"})},
        attrs={"units": units, "long_name": "2 m temperature", "standard_name": "air_temperature"},
    )


def without_history(obj):
    obj = obj.copy()
    obj.attrs.pop("history", None)
    return obj


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [np.arange(5.0), np.linspace(58, 50, 9), np.array([0, 1, 3, 3.5, 7])])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_fine_coordinate_block_means_give_back_the_coarse(values, factor):
    fine = fine_coordinate(values, factor)
    np.testing.assert_allclose(fine.reshape(-1, factor).mean(1), values, rtol=0, atol=1e-12)
    assert np.all(np.sign(np.diff(fine)) == np.sign(values[1] - values[0]))  # monotone, same direction
    if np.allclose(np.diff(values), values[1] - values[0]):  # uniform grid: uniform fine spacing
        np.testing.assert_allclose(np.diff(fine), (values[1] - values[0]) / factor, atol=1e-12)


def test_fine_coordinate_recovers_a_block_mean_coarsened_grid():
    fine = np.linspace(58.0, 50.25, 32)  # ERA5's 0.25 degree UK latitudes
    coarse = fine.reshape(8, 4).mean(1)
    np.testing.assert_allclose(fine_coordinate(coarse, 4), fine, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 values"):
        fine_coordinate(np.array([1.0]), 4, "lat")


def test_round_trip_keeps_coords_attrs_and_adds_members():
    da = grid()
    model = StandIn()
    out = downscale(da, 4, 5, model=model, seed=3)
    assert out.dims == ("time", "member", "lat", "lon") and out.shape == (3, 5, 24, 32)
    assert out.name == "t2m" and out.dtype == np.float32
    assert {k: v for k, v in out.attrs.items() if k != "history"} == da.attrs
    assert "sciddiff.climate.downscale(factor=4, members=5" in out.attrs["history"]
    assert "seed=3" in out.attrs["history"]
    assert out.lat.attrs == da.lat.attrs and out.lon.attrs == da.lon.attrs
    np.testing.assert_array_equal(out.time, da.time)
    np.testing.assert_array_equal(out.member, np.arange(5))
    np.testing.assert_allclose(out.lat.coarsen(lat=4).mean(), da.lat, atol=1e-12)
    # nearest upsampling + N(0, 0.1^2) noise: block means of the member mean are the input
    err = out.mean("member").coarsen(lat=4, lon=4).mean() - da
    assert float(np.abs(err).max()) < 0.05 and float(out.std("member").mean()) == pytest.approx(0.1, rel=0.15)
    # every sample got its own model call with the members batched, no sampler overrides
    assert [c["shape"] for c in model.calls] == [(1, 1, 6, 8)] * 3 and model.calls[0]["sampler"] is None


def test_seed_makes_results_reproducible_and_independent_of_batching():
    da = grid(times=4)
    a = downscale(da, 4, 3, model=StandIn(), seed=7)
    b = downscale(da, 4, 3, model=StandIn(), seed=7, batch_size=1)
    c = downscale(da, 4, 3, model=StandIn(), seed=8)
    xr.testing.assert_identical(without_history(a), without_history(b))
    assert not np.allclose(a, c)
    # sample t alone, with its own generator, equals the slice of the batched run
    t = 2
    gen = torch.Generator().manual_seed(sample_seed(7, t))
    alone = StandIn().predict(torch.as_tensor(da.values[t:t + 1, None]), members=3, generator=gen)[0, :, 0]
    np.testing.assert_array_equal(a.isel(time=t).values, alone.numpy())
    assert "seed=" in downscale(da, 4, 1, model=StandIn()).attrs["history"]  # a drawn seed is recorded


def test_extra_dims_are_batched_and_dataset_variables_kept():
    base = grid(times=2)
    da = xr.concat([base, base + 1.0], dim=xr.DataArray([850, 500], dims="level", name="level"))
    da = da.transpose("level", "time", "lat", "lon")
    ds = xr.Dataset({"t2m": da, "station_count": ("time", [3, 4]), "orog": base.isel(time=0)},
                    attrs={"title": "test", "history": "created"})
    model = StandIn()
    out = downscale(ds, 4, 2, model=model, mode="regression", seed=0)
    assert isinstance(out, xr.Dataset) and set(out.data_vars) == {"t2m", "station_count"}
    assert out.t2m.dims == ("level", "time", "lat", "lon")  # regression: no member dim
    assert out.attrs["title"] == "test" and out.attrs["history"].endswith("\ncreated")
    np.testing.assert_array_equal(out.level, [850, 500])
    np.testing.assert_array_equal(out.t2m.isel(level=1) - out.t2m.isel(level=0), 1.0)
    expected = da.values.repeat(4, axis=-2).repeat(4, axis=-1)
    np.testing.assert_array_equal(out.t2m.values, expected)  # regression of the stand-in is exact
    assert model.calls[0]["shape"] == (4, 1, 6, 8)  # regression batches the 2 x 2 samples


@pytest.mark.parametrize("dims", [("lat", "lon"), ("latitude", "longitude"), ("y", "x")])
def test_lat_lon_and_y_x_names(dims):
    da = grid(dims=dims)
    assert grid_dims(da) == dims
    out = downscale(da, 4, 2, model=StandIn(static_weight=1.0), mode="regression")
    assert out.dims == ("time", *dims) and out.shape == (3, 24, 32)
    # static fields follow the fine coordinates: sin(lat) was added by the stand-in
    lat = out[dims[0]].values
    expected = da.values.repeat(4, 1).repeat(4, 2) + np.sin(np.deg2rad(lat))[None, :, None]
    np.testing.assert_allclose(out.values, expected, rtol=1e-6)


def test_spatial_dims_detected_by_cf_axis_or_given_explicitly():
    da = grid().rename(lat="row", lon="col")
    with pytest.raises(ValueError, match="cannot tell its spatial dims"):
        downscale(da, 4, 1, model=StandIn())
    da["col"].attrs["axis"] = "X"  # row already has axis="Y"
    assert downscale(da, 4, 1, model=StandIn(), mode="regression").dims == ("time", "row", "col")
    plain = grid().rename(lat="a", lon="b")
    for c in ("a", "b"):
        plain[c].attrs = {}
    out = downscale(plain, 4, 1, model=StandIn(), mode="regression", spatial_dims=("a", "b"))
    assert out.shape == (3, 24, 32)


def test_celsius_input_is_converted_for_the_model_and_back():
    kelvin = grid()
    celsius = (kelvin - 273.15).assign_attrs(kelvin.attrs, units="degC")
    with pytest.warns(UserWarning, match="converted to the model's 'K'"):
        out_c = downscale(celsius, 4, 2, model=StandIn(), seed=1)
    out_k = downscale(kelvin, 4, 2, model=StandIn(), seed=1)
    assert out_c.attrs["units"] == "degC"
    np.testing.assert_allclose(out_c.values, out_k.values - 273.15, atol=1e-3)
    with pytest.raises(ValueError, match="units 'm s-1' but the model expects 'K'"):
        downscale(kelvin.assign_attrs(units="m s-1"), 4, 1, model=StandIn())
    with pytest.warns(UserWarning, match="no 'units' attribute"):
        downscale(kelvin.drop_attrs(), 4, 1, model=StandIn())
    downscale(kelvin.assign_attrs(units="kelvin"), 4, 1, model=StandIn())  # a synonym: no warning


def test_nans_raise_naming_the_variable_unless_masked():
    da = grid(times=4)
    da[2, 1, 3] = np.nan
    with pytest.raises(ValueError, match=r"variable 't2m' has 1 missing \(NaN\) values, first at time=2"):
        downscale(da, 4, 2, model=StandIn())
    out = downscale(da, 4, 2, model=StandIn(), missing="mask", seed=0)
    nan = np.isnan(out.values)
    assert nan[2, :, 4:8, 12:16].all() and nan.sum() == 2 * 16
    clean = downscale(da.fillna(0), 4, 2, model=StandIn(), seed=0)  # other samples untouched
    np.testing.assert_array_equal(out.isel(time=[0, 1, 3]), clean.isel(time=[0, 1, 3]))


def test_bad_options_give_clear_errors():
    da = grid()
    with pytest.raises(ValueError, match="factor=2 does not match the model's factor 4"):
        downscale(da, 2, 4, model=StandIn())
    assert downscale(da, None, 1, model=StandIn()).sizes["lat"] == 24  # None: the model's factor
    with pytest.raises(ValueError, match="mode must be one of"):
        downscale(da, 4, 2, model=StandIn(), mode="ddim")
    with pytest.raises(ValueError, match="members must be a positive int"):
        downscale(da, 4, 0, model=StandIn())
    with pytest.raises(ValueError, match="missing must be one of"):
        downscale(da, 4, 1, model=StandIn(), missing="drop")
    ds = xr.Dataset({"a": da, "b": da})
    with pytest.raises(ValueError, match="cannot tell which to downscale"):
        downscale(ds, 4, 1, model=StandIn(variables=("sst",)))
    with pytest.raises(ValueError, match=r"variable\(s\) \['zz'\] not in the dataset"):
        downscale(ds, 4, 1, model=StandIn(), var="zz")
    assert set(downscale(ds, 4, 1, model=StandIn(), var="b").data_vars) == {"b"}
    with pytest.raises(ValueError, match="takes 2 variables"):
        downscale(da, 4, 1, model=StandIn(variables=("u", "v"), units=("m s-1", "m s-1")))


def test_multi_variable_model_gets_its_channels_in_order():
    u, v = grid(name="u", units="m s-1"), grid(name="v", units="m s-1", seed=1)
    ds = xr.Dataset({"v": v, "u": u})
    model = StandIn(variables=("u", "v"), units=("m s-1", "m s-1"))
    out = downscale(ds, 4, 1, model=model, mode="regression")
    np.testing.assert_array_equal(out.u.values, u.values.repeat(4, 1).repeat(4, 2))
    np.testing.assert_array_equal(out.v.values, v.values.repeat(4, 1).repeat(4, 2))


def test_encodings_kept_where_meaningful():
    da = grid()
    da.encoding = {"dtype": np.dtype("float32"), "zlib": True, "complevel": 4, "chunksizes": (3, 6, 8),
                   "original_shape": (3, 6, 8), "source": "x.nc", "coordinates": "number step"}
    da["lat"].encoding = {"dtype": np.dtype("float64"), "chunksizes": (6,)}
    out = downscale(da, 4, 1, model=StandIn())
    assert out.encoding == {"dtype": np.dtype("float32"), "zlib": True, "complevel": 4}
    assert out.lat.encoding == {"dtype": np.dtype("float64")}


def test_patches_give_the_whole_field_result_for_a_pointwise_model():
    da = grid(ny=10, nx=14)
    model = StandIn(static_weight=1.0)
    whole = downscale(da, 4, 3, model=model, mode="regression")
    tiled = downscale(da, 4, 3, model=model, mode="regression", patch=6, overlap=2)
    np.testing.assert_allclose(tiled.values, whole.values, rtol=1e-6)
    assert (3, 1, 6, 6) in [c["shape"] for c in model.calls]  # it really ran on windows
    assert "patch=6, overlap=2" in tiled.attrs["history"]


def test_accessor_matches_the_function():
    import sciddiff.climate._xarray  # noqa: F401  (registers the accessors)

    da = grid()
    by_fn = downscale(da, 4, 2, model=StandIn(), seed=5)
    by_acc = da.sciddiff.downscale(factor=4, members=2, model=StandIn(), seed=5)
    xr.testing.assert_identical(without_history(by_acc), without_history(by_fn))
    ds_out = da.to_dataset().sciddiff.downscale(factor=4, members=2, model=StandIn(), seed=5)
    xr.testing.assert_identical(without_history(ds_out.t2m), without_history(by_fn))


# ------------------------------------------------------------------------------------------------
# a real (tiny, untrained) Downscaler: static channels, samplers, conservation
@pytest.fixture(scope="module")
def tiny_downscaler():
    from sciddiff.climate._model import Downscaler, DownscalerMeta

    torch.manual_seed(0)
    meta = DownscalerMeta(variables=("t2m",), units=("K",), factor=4, mean=(280.0,), std=(4.0,),
                          residual_std=(0.5,), frequencies=(1.0, 4.0), nfe=3)
    unet = {"base": 8, "mults": [1], "blocks": 1}
    model = Downscaler(meta, unet, unet).eval()
    with torch.no_grad():  # the zero-initialised output layers would make every member identical
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_real_downscaler_conserves_block_means_with_and_without_patches(tiny_downscaler):
    da = grid(ny=8, nx=12, times=2)
    for kw in ({}, {"patch": 6, "overlap": 2}):
        out = downscale(da, 4, 2, model=tiny_downscaler, seed=0, conserve=True, nfe=2, **kw)
        assert out.shape == (2, 2, 32, 48) and np.isfinite(out.values).all()
        assert float(out.std("member").mean()) > 0
        means = out.coarsen(lat=4, lon=4).mean()
        np.testing.assert_allclose(means.values, np.broadcast_to(da.values[:, None], means.shape), atol=2e-4)
    reg = downscale(da, 4, 2, model=tiny_downscaler, mode="regression")
    assert reg.dims == ("time", "lat", "lon")


@pytest.mark.skipif(not ERA5.exists(), reason=f"ERA5 UK sample not present at {ERA5}")
def test_era5_coarsened_then_downscaled_recovers_the_fine_grid(tiny_downscaler):
    fine = read_dataset(ERA5).t2m.isel(time=slice(0, 2), lat=slice(0, 32), lon=slice(0, 48))
    coarse = fine.coarsen(lat=4, lon=4).mean().assign_attrs(fine.attrs)
    coarse["lat"].attrs, coarse["lon"].attrs = fine.lat.attrs, fine.lon.attrs
    out = downscale(coarse, 4, 2, model=tiny_downscaler, mode="regression")
    np.testing.assert_allclose(out.lat.values, fine.lat.values, atol=1e-9)
    np.testing.assert_allclose(out.lon.values, fine.lon.values, atol=1e-9)
    assert out.attrs["units"] == "K" and out.lat.attrs == fine.lat.attrs


# ------------------------------------------------------------------------------------------------
# files
@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_write_and_read_back(tmp_path, suffix):
    out = downscale(grid().to_dataset(), 4, 3, model=StandIn(), seed=0)
    path = write_dataset(out, tmp_path / f"out{suffix}")
    back = read_dataset(path)
    xr.testing.assert_identical(back, out)
    assert back.t2m.dims == ("time", "member", "lat", "lon") and back.attrs["history"] == out.attrs["history"]
    assert sorted(os.listdir(tmp_path)) == [f"out{suffix}"]  # no temporary left behind
    write_dataset(out.isel(member=[0]), path)  # overwrite an existing file / store
    assert read_dataset(path).sizes["member"] == 1 and sorted(os.listdir(tmp_path)) == [f"out{suffix}"]
    with pytest.raises(FileExistsError):
        write_dataset(out, path, overwrite=False)
    lazy = read_dataset(path, chunks={})
    assert lazy.t2m.chunks is not None


def _failing(ds):
    """``ds`` plus a dask variable whose second chunk raises while being written."""
    def boom(block, block_info=None):
        if block_info[None]["chunk-location"][0] == 1:
            raise RuntimeError("disk on fire")
        return block

    bad = dsa.map_blocks(boom, dsa.ones((4, 5), chunks=(2, 5)), dtype=float)
    return ds.assign(bad=(("t", "k"), bad))


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_failed_write_leaves_no_partial_file(tmp_path, suffix):
    ds = grid().to_dataset()
    path = tmp_path / f"out{suffix}"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dataset(_failing(ds), path)
    assert os.listdir(tmp_path) == []
    write_dataset(ds, path)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dataset(_failing(ds + 1), path)
    assert sorted(os.listdir(tmp_path)) == [f"out{suffix}"]
    xr.testing.assert_identical(read_dataset(path), ds)  # the old content survived


def test_read_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_dataset(tmp_path / "missing.nc")
    text = tmp_path / "notes.nc"
    text.write_text("hello, not netcdf")
    with pytest.raises(ValueError, match="notes.nc: not a NetCDF"):
        read_dataset(text)
    good = write_dataset(grid().to_dataset(), tmp_path / "good.nc")
    truncated = tmp_path / "truncated.nc"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated.nc: could not be read as netcdf"):
        read_dataset(truncated)
    (tmp_path / "dir.zarr").mkdir()
    with pytest.raises(ValueError, match="not a Zarr store"):
        read_dataset(tmp_path / "dir.zarr")
    with pytest.raises(ValueError, match="unknown output format '.csv'"):
        write_dataset(grid().to_dataset(), tmp_path / "x.csv")


def test_downscale_file(tmp_path):
    src = write_dataset(grid().to_dataset(), tmp_path / "in.nc")
    out = downscale_file(src, tmp_path / "out.zarr", var="t2m", factor=4, members=2, model=StandIn(), seed=1)
    back = read_dataset(out)
    direct = downscale(read_dataset(src), 4, 2, var="t2m", model=StandIn(), seed=1)
    xr.testing.assert_equal(back, direct)
    lazy = downscale_file(src, tmp_path / "lazy.nc", var="t2m", members=2, model=StandIn(), seed=1,
                          chunks={"time": 2})
    xr.testing.assert_equal(read_dataset(lazy), direct)
    with pytest.raises(ValueError, match="unknown output format"):
        downscale_file(src, tmp_path / "out.txt", var="t2m", model=StandIn())


def test_default_model_is_the_bundled_checkpoint():
    from sciddiff.climate._model import BUNDLED_DIR, META_FILE

    da = grid(ny=8, nx=12, times=1)
    if not (BUNDLED_DIR / META_FILE).exists():
        with pytest.raises(FileNotFoundError, match="no bundled checkpoint is installed"):
            downscale(da, 4, 1)
    else:
        assert downscale(da, 4, 1, mode="regression").shape == (1, 32, 48)
