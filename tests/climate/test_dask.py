"""Dask-backed downscaling stays lazy, and equals the eager result exactly on a distributed cluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from sciddiff.climate._xarray import downscale, read_dataset, write_dataset

distributed = pytest.importorskip("distributed")


class StandIn(torch.nn.Module):
    """``Downscaler.predict``'s interface: nearest upsampling plus member-dependent noise."""

    factor, variables, units, name = 4, ("t2m",), ("K",), "stand-in"

    def predict(self, coarse, static=None, *, members=16, mode="diffusion", sampler=None, nfe=None,
                generator=None, conserve=False):
        up = coarse.repeat_interleave(4, -2).repeat_interleave(4, -1)
        if mode == "regression":
            return up[:, None]
        return up[:, None] + 0.1 * torch.randn(coarse.shape[0], members, *up.shape[1:], generator=generator)


def field(times=6, levels=2, ny=6, nx=8):
    rng = np.random.default_rng(0)
    return xr.DataArray(
        (280 + rng.normal(size=(times, levels, ny, nx))).astype("float32"),
        dims=("time", "level", "lat", "lon"), name="t2m", attrs={"units": "K"},
        coords={"time": np.arange(times), "level": [850, 500], "lat": np.linspace(58, 53, ny),
                "lon": np.linspace(-10, -3, nx)},
    ).to_dataset().assign_attrs(title="dask test")


def strip(ds):
    ds = ds.copy()
    ds.attrs.pop("history", None)
    return ds


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_downscaler():
    from sciddiff.climate._model import Downscaler, DownscalerMeta

    torch.manual_seed(0)
    meta = DownscalerMeta(variables=("t2m",), units=("K",), factor=4, mean=(280.0,), std=(4.0,),
                          residual_std=(0.5,), frequencies=(1.0,), nfe=2)
    unet = {"base": 8, "mults": [1], "blocks": 1}
    model = Downscaler(meta, unet, unet).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_lazy_equals_eager_on_a_local_cluster(client):
    ds = field()
    eager = downscale(ds, 4, 3, model=StandIn(), seed=11)
    lazy = downscale(ds.chunk({"time": 4, "level": 1, "lat": 3}), 4, 3, model=StandIn(), seed=11)
    data = lazy.t2m.data
    assert hasattr(data, "dask") and data.chunks == ((4, 2), (1, 1), (3,), (24,), (32,))
    computed = lazy.compute()
    xr.testing.assert_identical(strip(computed), strip(eager))  # exactly equal, coords and attrs too
    # other chunkings give the same numbers: each sample's generator depends on its index only
    other = downscale(ds.chunk({"time": 1}), 4, 3, model=StandIn(), seed=11).compute()
    np.testing.assert_array_equal(other.t2m.values, eager.t2m.values)


def test_real_downscaler_lazy_equals_eager(client, tiny_downscaler):
    ds = field(times=3)
    kw = dict(model=tiny_downscaler, seed=2, nfe=2)
    eager = downscale(ds, 4, 2, **kw)
    lazy = downscale(ds.chunk({"time": 2}), 4, 2, **kw).compute()
    np.testing.assert_array_equal(lazy.t2m.values, eager.t2m.values)
    assert float(eager.t2m.std("member").mean()) > 0


def test_lazy_nan_error_is_raised_at_compute(client):
    ds = field()
    ds.t2m[4, 1, 2, 2] = np.nan
    lazy = downscale(ds.chunk({"time": 2}), 4, 2, model=StandIn(), seed=0)  # builds fine
    with pytest.raises(ValueError, match="variable 't2m' has 1 missing .* first at time=4, level=1"):
        lazy.compute()


def test_lazy_result_streams_to_zarr_and_netcdf(client, tmp_path):
    ds = field()
    eager = downscale(ds, 4, 2, model=StandIn(), seed=4)
    lazy = downscale(ds.chunk({"time": 4}), 4, 2, model=StandIn(), seed=4)
    for name in ("out.zarr", "out.nc"):
        back = read_dataset(write_dataset(lazy, tmp_path / name))
        np.testing.assert_array_equal(back.t2m.values, eager.t2m.values)
        assert back.t2m.dims == ("time", "level", "member", "lat", "lon")
