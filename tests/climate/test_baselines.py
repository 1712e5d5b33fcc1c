"""Interpolation baselines (against independent implementations and the issue's figures), the plots
and the climate benchmark script."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import ndimage
from scipy.interpolate import RegularGridInterpolator

from sciddiff.climate._baselines import ISSUE_CONVENTION, ISSUE_RMSE, interpolate, interpolate_tensor
from sciddiff.climate._data import ERA5_UK_FILE, coarsen, data_root, era5_uk_splits, load_era5_uk
from sciddiff.climate._metrics import rmse
from sciddiff.climate._plot import plot_maps, plot_rank_histogram, plot_spectra

ERA5_UK = data_root() / "climate" / ERA5_UK_FILE
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def uk_test():
    if not ERA5_UK.exists():
        pytest.skip(f"ERA5 UK data not found at {ERA5_UK} (set SCIDDIFF_DATA to the folder holding "
                    "climate/; see /work/shared/data/SOURCES.md)")
    return era5_uk_splits(load_era5_uk()).test


def _keys_matrix(h: int, f: int, align: str, a: float = -0.75) -> np.ndarray:
    """1-D Keys (1981) cubic-convolution upsampling matrix ``[h f, h]`` with clamped indices."""
    H = h * f
    src = (np.arange(H) + 0.5) / f - 0.5 if align == "centres" else np.arange(H) * (h - 1) / (H - 1)

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    A = np.zeros((H, h))
    for i, x in enumerate(src):
        base = math.floor(x)
        for k in range(base - 1, base + 3):
            A[i, min(max(k, 0), h - 1)] += kernel(x - k)
    return A


def _coarse(h=6, w=8, lead=(3,), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, h, w, generator=g, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------
# tensor level
@pytest.mark.parametrize("align", ["centres", "corners"])
def test_bicubic_matches_an_independent_keys_implementation(dtype, align):
    c = _coarse(dtype=dtype)
    Ay, Ax = _keys_matrix(6, 4, align), _keys_matrix(8, 4, align)
    ref = np.einsum("ij,bjk,lk->bil", Ay, c.double().numpy(), Ax)
    out = interpolate_tensor(c, 4, "bicubic", align=align)
    assert out.shape == (3, 24, 32) and out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=tol, atol=tol)


def test_bilinear_matches_scipy_on_cell_centres():
    """Cell-centred bilinear = linear interpolation between coarse centres (at fine position
    (i + 0.5) / f - 0.5 in coarse-index units), constant beyond the outermost centres."""
    c = _coarse(lead=(1,))
    f, h, w = 4, 6, 8
    ys = np.clip((np.arange(h * f) + 0.5) / f - 0.5, 0, h - 1)
    xs = np.clip((np.arange(w * f) + 0.5) / f - 0.5, 0, w - 1)
    rgi = RegularGridInterpolator((np.arange(h), np.arange(w)), c[0].numpy())
    ref = rgi(np.stack(np.meshgrid(ys, xs, indexing="ij"), -1))
    np.testing.assert_allclose(interpolate_tensor(c, f, "bilinear")[0].numpy(), ref, atol=1e-12)


def test_bilinear_reproduces_linear_fields_between_coarse_centres(dtype):
    """Block means of a linear field are its values at the block centres, so cell-centred bilinear
    interpolation recovers it exactly between the outermost coarse centres; corner alignment does not."""
    i, j = torch.meshgrid(torch.arange(32, dtype=dtype), torch.arange(48, dtype=dtype), indexing="ij")
    fine = 0.3 * i - 0.2 * j + 1.0
    coarse = fine.reshape(8, 4, 12, 4).mean((1, 3))
    inner = (slice(2, 30), slice(2, 46))
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    up = interpolate_tensor(coarse, 4, "bilinear")
    torch.testing.assert_close(up[inner], fine[inner], rtol=0, atol=tol)
    corners = interpolate_tensor(coarse, 4, "bilinear", align="corners")
    assert (corners - fine)[inner].abs().max() > 0.1


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "spline"])
def test_constant_fields_stay_constant(method):
    c = torch.full((2, 5, 7), 3.25, dtype=torch.float64)
    for align in ("centres", "corners"):
        up = interpolate_tensor(c, 3, method, align=align)
        torch.testing.assert_close(up, torch.full((2, 15, 21), 3.25, dtype=torch.float64))


def test_spline_is_scipys_cubic_b_spline():
    c = _coarse()
    for align, grid_mode in (("centres", True), ("corners", False)):
        ref = ndimage.zoom(c.numpy(), (1, 4, 4), order=3, mode="nearest", grid_mode=grid_mode)
        np.testing.assert_allclose(interpolate_tensor(c, 4, "spline", align=align).numpy(), ref, atol=1e-12)


def test_corners_is_align_corners_true():
    c = _coarse()
    F = torch.nn.functional
    for method in ("bilinear", "bicubic"):
        ref = F.interpolate(c[:, None], size=(24, 32), mode=method, align_corners=True)[:, 0]
        torch.testing.assert_close(interpolate_tensor(c, 4, method, align="corners"), ref)


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "spline"])
def test_periodic_longitude_commutes_with_rolls(method):
    """With periodic padding, rolling the coarse field by one cell rolls the output by f cells."""
    c = _coarse(h=5, w=12)
    up = interpolate_tensor(c, 4, method, periodic_lon=True)
    rolled = interpolate_tensor(torch.roll(c, 1, -1), 4, method, periodic_lon=True)
    torch.testing.assert_close(rolled, torch.roll(up, 4, -1), rtol=0, atol=1e-12)
    flat = interpolate_tensor(torch.roll(c, 1, -1), 4, method)
    assert (flat - torch.roll(interpolate_tensor(c, 4, method), 4, -1)).abs().max() > 1e-3


def test_tensor_option_errors():
    c = _coarse()
    with pytest.raises(ValueError, match="method must be one of"):
        interpolate_tensor(c, 4, "nearest")
    with pytest.raises(ValueError, match="align must be one of"):
        interpolate_tensor(c, 4, align="edges")
    with pytest.raises(ValueError, match="positive integer"):
        interpolate_tensor(c, 0)
    with pytest.raises(ValueError, match="periodic_lon needs align='centres'"):
        interpolate_tensor(c, 4, align="corners", periodic_lon=True)


# ------------------------------------------------------------------------------------------------
# xarray level
def _fine_da(T=2, H=16, W=24, dtype=np.float32):
    rng = np.random.default_rng(0)
    return xr.DataArray(rng.normal(280, 2, (T, H, W)).astype(dtype), dims=("time", "lat", "lon"),
                        coords={"time": np.arange(T), "lat": 58.0 - 0.25 * np.arange(H),
                                "lon": -10.0 + 0.25 * np.arange(W)},
                        name="t2m", attrs={"units": "K", "history": "made"})


def test_interpolate_dataarray_keeps_grid_dims_attrs_and_dtype():
    fine = _fine_da()
    coarse = coarsen(fine, 4)
    up = interpolate(coarse, fine, "bicubic")
    assert up.dims == fine.dims and up.shape == fine.shape and up.dtype == np.float32
    np.testing.assert_array_equal(up.lat.values, fine.lat.values)
    np.testing.assert_array_equal(up.time.values, fine.time.values)
    assert up.attrs["units"] == "K" and "cell_methods" not in up.attrs
    assert up.attrs["history"].startswith("made\n") and "method='bicubic'" in up.attrs["history"]
    ref = interpolate_tensor(torch.tensor(coarse.values, dtype=torch.float64), 4, "bicubic").numpy()
    np.testing.assert_allclose(up.values, ref, rtol=1e-6)
    # without a target grid: fine centres subdivide the coarse cells (block means give them back)
    free = interpolate(coarse, None, "bilinear", factor=4)
    np.testing.assert_allclose(free.lat.values, fine.lat.values, atol=1e-12)
    np.testing.assert_allclose(free.lon.values, fine.lon.values, atol=1e-12)
    # other dim orders come back in the coarse's order, spatial dims last
    swapped = interpolate(coarse.transpose("lat", "time", "lon"), fine, "bilinear")
    assert swapped.dims == ("time", "lat", "lon")


def test_interpolate_dataarray_errors():
    fine = _fine_da()
    coarse = coarsen(fine, 4)
    with pytest.raises(ValueError, match="not the same integer multiple"):
        interpolate(coarse, fine.isel(lat=slice(0, 14)))
    with pytest.raises(ValueError, match="pass fine_like"):
        interpolate(coarse)
    with pytest.raises(ValueError, match="factor=2 contradicts"):
        interpolate(coarse, fine, factor=2)
    with pytest.raises(ValueError, match="cannot tell its two spatial dims"):
        interpolate(coarse.rename(lat="a"), fine)


def test_interpolate_detects_periodic_longitude():
    lon = np.arange(0.0, 360.0, 10.0)
    c = xr.DataArray(np.random.default_rng(1).normal(size=(4, 36)), dims=("lat", "lon"),
                     coords={"lat": [30.0, 10.0, -10.0, -30.0], "lon": lon})
    up = interpolate(c, None, "bicubic", factor=2)
    ref = interpolate_tensor(torch.tensor(c.values), 2, "bicubic", periodic_lon=True).numpy()
    np.testing.assert_allclose(up.values, ref)
    np.testing.assert_allclose(up.lon.values[:2], [-2.5, 2.5])


# ------------------------------------------------------------------------------------------------
# the issue's figures
def test_issue_figures_are_reproduced(uk_test):
    truth = uk_test.fine.values.astype(np.float64)
    for label, quoted in ISSUE_RMSE.items():
        method, align = ISSUE_CONVENTION[label]
        got = rmse(truth, interpolate(uk_test.coarse, uk_test.fine, method, align=align).values)
        assert got == pytest.approx(quoted, abs=0.001), label
    # the cell-centred baselines are better than the issue's (corner-aligned) ones
    centred = {m: rmse(truth, interpolate(uk_test.coarse, uk_test.fine, m).values)
               for m in ("bilinear", "bicubic")}
    assert centred["bilinear"] == pytest.approx(0.7283, abs=0.001)
    assert centred["bicubic"] == pytest.approx(0.6659, abs=0.001)


# ------------------------------------------------------------------------------------------------
# plots
def test_plots_write_pngs(tmp_path):
    fine = _fine_da(T=1)
    coarse = coarsen(fine, 4)
    p = plot_maps(fine, coarse, fine, fine, fine - fine + 0.3, tmp_path / "maps.png", title="t")
    assert p.read_bytes()[:8] == PNG_MAGIC
    plot_maps(fine.values[0], coarse.values[0], fine.values[0], None, None, tmp_path / "det.png")
    k = np.arange(1, 9) / 16
    plot_spectra({"truth": 1 / k, "model": 0.5 / k}, k, tmp_path / "spec.png")
    plot_rank_histogram([5, 4, 6, 5], tmp_path / "rank.png")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["det.png", "maps.png", "rank.png", "spec.png"]
    with pytest.raises(ValueError, match="spectrum 'model' has 3 values for 8 wavenumbers"):
        plot_spectra({"model": [1, 2, 3]}, k, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="must be 2-D"):
        plot_maps(np.zeros((2, 3, 4)), coarse, fine, None, None, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# ------------------------------------------------------------------------------------------------
# the benchmark
def _noisy_bicubic(fine_like: xr.DataArray, members: int = 6):
    """A stand-in ensemble predictor: bicubic plus member noise of 0.6 K."""
    def predict(coarse: xr.DataArray) -> xr.DataArray:
        mean = interpolate(coarse, fine_like, "bicubic").astype(np.float64)
        noise = np.random.default_rng(0).normal(0.0, 0.6, (members, *mean.shape))
        return (mean + xr.DataArray(noise, dims=("member", *mean.dims))).transpose("time", "member", ...)

    return predict


def test_benchmark_quick_run(uk_test, tmp_path):
    from sciddiff import cli

    bench = cli.load_benchmark("climate")  # as `sciddiff bench climate` loads it
    fine_q = uk_test.fine.isel(time=slice(None, None, bench.QUICK_STRIDE))
    record = bench.run(tmp_path, quick=True, baselines_only=True, quiet=True,
                       predictors={"noisy bicubic": _noisy_bicubic(fine_q)})
    names = set(record["methods"])
    assert {"bilinear", "bicubic", "local linear", "noisy bicubic"} <= names
    # the per-pixel regression, fitted on 1-21 March, beats interpolation by far (0.29 against 0.67 K)
    assert record["methods"]["local linear"]["rmse"] < 0.5 * record["methods"]["bicubic"]["rmse"]
    assert record["meta"]["mode"] == "quick" and "28 hourly fields" in record["meta"]["scored"]
    for row in record["issue_check"]:
        assert abs(row["difference"]) < 0.001
    ens = record["methods"]["noisy bicubic"]
    assert ens["members"] == 6 and ens["crps_fair"] is not None and sum(ens["rank_histogram"]) == 28 * 32 * 48
    assert record["methods"]["bicubic"]["crps_fair"] is None
    files = {p.name for p in Path(tmp_path).iterdir()}
    assert {"climate.json", "climate.md", "climate_maps.png", "climate_spectra.png",
            "climate_rank_histogram.png"} <= files
    assert json.loads((tmp_path / "climate.json").read_text())["methods"].keys() == record["methods"].keys()
    md = (tmp_path / "climate.md").read_text()
    assert "| noisy bicubic | 6 |" in md and "0.776" in md
    with pytest.raises(ValueError, match="'broken': output"):
        bench.run(tmp_path / "x", quick=True, baselines_only=True, quiet=True,
                  predictors={"broken": lambda c: c})
