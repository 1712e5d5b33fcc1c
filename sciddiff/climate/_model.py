"""The downscaling model: a regression UNet for the conditional mean plus an EDM diffusion model of
the residual (CorrDiff: Mardani et al. 2023, "Residual corrective diffusion modeling for km-scale
atmospheric downscaling").

With ``y`` the fine field and ``c`` its coarse (block-mean) version, both normalised per channel:

    up    = bicubic(c)                                   # [B, C, H, W]
    mu    = up + R(up, static)                           # regression UNet: E[y | c] (MSE-trained)
          (or mu = L(c), a per-pixel ridge map; mean_model="local_linear", ``_linear``)
    r     = (y - mu) / residual_scale                    # residual, ~unit-scale (sigma_data)
    r    ~ p(r | up, static)                             # EDM diffusion (Karras et al. 2022)
    y_hat = mu + residual_scale * r

and the physical field is ``y_hat * std + mean``. The diffusion network sees
``concat(r_t, up, static)`` along channels; the regression network ``concat(up, static)``.
Everything here is tensor-level; the xarray front end lives in ``_xarray.py``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .._atomic import atomic_write, atomic_write_text
from ..core import EDM, EDMPrecond, Model, State
from ..samplers import dpmpp_2m, edm_rho, euler, heun, unipc
from ._baselines import interpolate_tensor
from ._linear import LinearMean
from ._unet import UNet

Mode = Literal["diffusion", "regression"]
SamplerName = Literal["heun", "dpmpp_2m", "unipc", "euler"]
MeanModel = Literal["unet", "local_linear"]
MODES: tuple[str, ...] = get_args(Mode)
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
MEAN_MODELS: tuple[str, ...] = get_args(MeanModel)

FORMAT = "sciddiff-downscaler/1"
WEIGHTS_FILE, META_FILE = "downscaler.safetensors", "downscaler.json"
#: The bundled models by name: ``load_downscaler(name)`` loads one (see README for their domains).
BUNDLED: dict[str, Path] = {name: Path(__file__).parent / "checkpoints" / name
                            for name in ("uk_t2m_x4", "uk_t2m_x4_linear", "global_t2m_x4")}
#: Where ``load_downscaler(None)`` looks for the default bundled model (UK 2 m temperature, x4).
BUNDLED_DIR = BUNDLED["uk_t2m_x4"]
DEFAULT_FREQUENCIES: tuple[float, ...] = (1.0, 4.0, 16.0, 64.0)


# ------------------------------------------------------------------------------------------------
# grid operations
def block_mean(fine: Tensor, factor: int) -> Tensor:
    """Mean over non-overlapping ``factor x factor`` blocks: ``[..., H, W] -> [..., H/f, W/f]``
    (the coarsening that defines the coarse field; ``H`` and ``W`` must be multiples of ``f``)."""
    H, W = fine.shape[-2:]
    if H % factor or W % factor:
        raise ValueError(f"block_mean: field size {H} x {W} is not a multiple of factor {factor}")
    x = fine.reshape(*fine.shape[:-2], H // factor, factor, W // factor, factor)
    return x.mean(dim=(-3, -1))


def upsample(coarse: Tensor, factor: int, periodic_lon: bool = False) -> Tensor:
    """Bicubic upsampling ``[B, C, h, w] -> [B, C, h f, w f]`` on cell-centred grids (Keys 1981
    cubic convolution, ``a = -0.75``, as ``torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False)``; edges clamp): ``interpolate_tensor(..., "bicubic")`` of the baselines,
    so the model's input and the bicubic baseline are the same field. With ``periodic_lon`` the
    longitude axis is first padded periodically by two coarse cells, so the interpolation wraps
    around a global grid."""
    if coarse.ndim != 4:
        raise ValueError(f"upsample: expected coarse [B, C, h, w], got shape {tuple(coarse.shape)}")
    return interpolate_tensor(coarse, factor, "bicubic", periodic_lon=periodic_lon)


def conserve_projection(fine: Tensor, coarse: Tensor, factor: int) -> Tensor:
    """Add to every ``factor x factor`` block the constant that makes its mean equal the coarse
    value: ``fine + repeat(coarse - block_mean(fine))``.

    This is the Euclidean (L2) projection of ``fine`` onto the affine set of fields whose block
    means are ``coarse``: the constraint's normal space is spanned by the block indicators, so the
    closest field differs from ``fine`` by a constant per block (as in the "hard constraint" layers
    of Harder et al. 2023, "Hard-constrained deep learning for climate downscaling", additive form).

    Shapes: ``fine [..., H, W]``, ``coarse [..., H/f, W/f]`` (same leading dims or broadcastable,
    e.g. ``fine [B, M, C, H, W]`` with ``coarse [B, 1, C, h, w]``); returns ``fine``'s shape.
    """
    H, W = fine.shape[-2:]
    h, w = coarse.shape[-2:]
    if (h * factor, w * factor) != (H, W):
        raise ValueError(
            f"conserve_projection: coarse grid {h} x {w} times factor {factor} is {h * factor} x "
            f"{w * factor}, but the fine grid is {H} x {W}"
        )
    delta = coarse.to(fine.dtype) - block_mean(fine, factor)
    return fine + delta.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def static_features(
    lat: Tensor | np.ndarray | Sequence[float],
    lon: Tensor | np.ndarray | Sequence[float],
    *,
    frequencies: Sequence[float] = DEFAULT_FREQUENCIES,
    extra: Mapping[str, Tensor | np.ndarray] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Static input channels ``[S, H, W]`` for a grid with cell centres ``lat [H]``, ``lon [W]``
    (degrees): for each frequency ``k``, ``sin(k lat), cos(k lat), sin(k lon), cos(k lon)`` (lat/lon
    in radians; multi-frequency sinusoidal position encodings, Vaswani et al. 2017, as CorrDiff's
    positional channels), then the ``extra`` fields ``[H, W]`` (e.g. orography, land-sea mask) in
    the given order. Integer ``k`` keep the longitude channels periodic on global grids.
    ``S = 4 * len(frequencies) + len(extra)``. Extra fields should be O(1) (standardise them).
    """
    # np.array copies: xarray coordinates are read-only, which torch warns about
    lat_t = torch.from_numpy(np.array(lat, dtype=np.float64))
    lon_t = torch.from_numpy(np.array(lon, dtype=np.float64))
    if lat_t.ndim != 1 or lon_t.ndim != 1 or not lat_t.numel() or not lon_t.numel():
        raise ValueError(f"static_features: lat and lon must be non-empty 1-D arrays, got shapes "
                         f"{tuple(lat_t.shape)} and {tuple(lon_t.shape)}")
    if not (torch.isfinite(lat_t).all() and torch.isfinite(lon_t).all()):
        raise ValueError("static_features: lat/lon contain NaN or inf")
    if float(lat_t.abs().max()) > 90:
        raise ValueError(f"static_features: latitudes must lie in [-90, 90] degrees, got up to "
                         f"{float(lat_t.abs().max())}")
    if any(float(k) <= 0 for k in frequencies):
        raise ValueError(f"static_features: frequencies must be positive, got {list(frequencies)}")
    H, W = lat_t.numel(), lon_t.numel()
    la, lo = torch.deg2rad(lat_t)[:, None].expand(H, W), torch.deg2rad(lon_t)[None, :].expand(H, W)
    chans = []
    for k in frequencies:
        chans += [torch.sin(k * la), torch.cos(k * la), torch.sin(k * lo), torch.cos(k * lo)]
    for name, v in (extra or {}).items():
        v = torch.as_tensor(np.asarray(v, dtype=np.float64))
        if v.shape != (H, W):
            raise ValueError(f"static_features: extra field {name!r} has shape {tuple(v.shape)}, "
                             f"expected the grid's ({H}, {W})")
        if not torch.isfinite(v).all():
            raise ValueError(f"static_features: extra field {name!r} contains NaN or inf")
        chans.append(v)
    if not chans:
        raise ValueError("static_features: no channels (empty frequencies and no extra fields)")
    return torch.stack(chans).to(dtype)


def static_feature_names(frequencies: Sequence[float] = DEFAULT_FREQUENCIES,
                         extra: Sequence[str] = ()) -> list[str]:
    """Channel names matching ``static_features`` (e.g. ``"sin(4 lat)"``)."""
    names = []
    for k in frequencies:
        kk = f"{float(k):g}"
        names += [f"sin({kk} lat)", f"cos({kk} lat)", f"sin({kk} lon)", f"cos({kk} lon)"]
    return names + list(extra)


def set_periodic_lon(module: nn.Module, periodic: bool) -> nn.Module:
    """Switch circular longitude padding on or off in every convolution of ``module`` (in place)."""
    for m in module.modules():
        if isinstance(getattr(m, "periodic_lon", None), bool):
            m.periodic_lon = bool(periodic)
    return module


# ------------------------------------------------------------------------------------------------
# networks with the engine's (conditional) signatures
_UNET_OWN = ("in_channels", "out_channels", "time_embedding")


def _unet_kwargs(unet: Mapping[str, Any] | None, owner: str) -> dict[str, Any]:
    kw = dict(unet or {})
    clash = [k for k in _UNET_OWN if k in kw]
    if clash:
        raise ValueError(f"{owner}: unet options {clash} are set by {owner} itself")
    return kw


class RegressionNet(nn.Module):
    """The regression stage: ``R(cond) -> [B, C, H, W]``, the conditional mean of the normalised
    fine field minus its bicubic upsample (CorrDiff's UNet-regression, Mardani et al. 2023).

    ``cond``: ``{"up": [B, C, H, W], "static": [B, S, H, W]}`` (``static`` absent where
    ``static_channels == 0``); the UNet input is ``concat(up, static)``.
    """

    def __init__(self, channels: int, static_channels: int = 0, unet: Mapping[str, Any] | None = None):
        super().__init__()
        self.channels, self.static_channels = int(channels), int(static_channels)
        self.unet_kwargs = _unet_kwargs(unet, "RegressionNet")
        self.unet = UNet(self.channels + self.static_channels, self.channels, time_embedding=False,
                         **self.unet_kwargs)

    @property
    def config(self) -> dict[str, Any]:
        return {"channels": self.channels, "static_channels": self.static_channels,
                "unet": {k: v for k, v in self.unet.config.items() if k not in _UNET_OWN}}

    def forward(self, cond: Mapping[str, Tensor]) -> Tensor:
        return self.unet(_inputs(cond, self.static_channels))

    def mean(self, cond: Mapping[str, Tensor]) -> Tensor:
        """Normalised conditional mean ``up + R(cond)`` ``[B, C, H, W]``."""
        return cond["up"] + self(cond)


class ResidualDenoiser(nn.Module):
    """The diffusion network with the engine's conditional signature
    ``net(x: State, c_noise: Tensor[B], cond) -> State`` for one dense field ``x [B, C, H, W]``
    (the noisy, preconditioned residual; use inside ``EDMPrecond``). The UNet input is
    ``concat(x, cond["up"], cond["static"])``; ``c_noise`` feeds its noise embedding.
    """

    def __init__(self, channels: int, static_channels: int = 0, unet: Mapping[str, Any] | None = None,
                 field: str = "x") -> None:
        super().__init__()
        self.channels, self.static_channels, self.field = int(channels), int(static_channels), field
        self.unet_kwargs = _unet_kwargs(unet, "ResidualDenoiser")
        self.unet = UNet(2 * self.channels + self.static_channels, self.channels, time_embedding=True,
                         **self.unet_kwargs)

    @property
    def config(self) -> dict[str, Any]:
        return {"channels": self.channels, "static_channels": self.static_channels, "field": self.field,
                "unet": {k: v for k, v in self.unet.config.items() if k not in _UNET_OWN}}

    def forward(self, x: State, t: Tensor, cond: Mapping[str, Tensor] | None = None) -> State:
        if cond is None:
            raise ValueError("ResidualDenoiser: a condition {'up': ..., 'static': ...} is required")
        h = torch.cat([x[self.field], _inputs(cond, self.static_channels)], dim=1)
        return x._with({self.field: self.unet(h, t)})


def _inputs(cond: Mapping[str, Tensor], static_channels: int) -> Tensor:
    """``concat(cond["up"], cond["static"])`` with shape checks ([B, C + S, H, W])."""
    if "up" not in cond:
        raise ValueError(f"condition lacks 'up' (the upsampled coarse field); got {sorted(cond)}")
    up = cond["up"]
    if static_channels == 0:
        return up
    st = cond.get("static")
    if st is None or st.shape[1] != static_channels or st.shape[-2:] != up.shape[-2:]:
        got = None if st is None else tuple(st.shape)
        raise ValueError(f"condition 'static' must be [B, {static_channels}, {up.shape[-2]}, "
                         f"{up.shape[-1]}], got {got}")
    return torch.cat([up, st.to(up.dtype).expand(up.shape[0], -1, -1, -1)], dim=1)


# ------------------------------------------------------------------------------------------------
@dataclass
class DownscalerMeta:
    """Everything but the weights: what the model predicts, its normalisation and provenance.

    Attributes:
        variables, units: channel names and physical units (``C`` each).
        factor: the fixed downscaling factor.
        mean, std: per-channel normalisation of the fine field (physical units; from training data).
        residual_std: per-channel std of the normalised regression residual ``y - mu`` on the
            training data; the diffusion works on ``r = (y - mu) * sigma_data / residual_std``.
        frequencies, static_extra: how the static channels were built (``static_features``).
        periodic_lon: global grid with periodic longitude (UNet padding and bicubic upsampling).
        sigma_data, sigma_min, sigma_max: the EDM process (Karras et al. 2022).
        sampler, nfe: default sampler and number of network evaluations for ``predict``.
        inflation: multiplicative ensemble inflation of the sampled residual (Anderson & Anderson
            1999); 1 = none. ``train_downscaler`` can fit it on validation data (``calibrate_spread``).
        cv_means: number ``K`` of cross-fitted mean models (``Downscaler.folds``) whose means
            the ensemble members take in turn (member ``m`` uses fold ``m mod K``); 0: every member
            uses the regression mean.
        mean_model: ``"unet"`` (CorrDiff's regression UNet) or ``"local_linear"`` (``LinearMean``:
            a per-pixel ridge map of the coarse neighbourhood, tied to the training grid).
        domain: training domain (``lat_min, lat_max, lon_min, lon_max, resolution, period``).
        training: training budget and data (steps, batch, patch, wall time, ...).
    """

    variables: tuple[str, ...]
    units: tuple[str, ...]
    factor: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    residual_std: tuple[float, ...]
    frequencies: tuple[float, ...] = DEFAULT_FREQUENCIES
    static_extra: tuple[str, ...] = ()
    periodic_lon: bool = False
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sampler: str = "heun"
    nfe: int = 19
    inflation: float = 1.0
    cv_means: int = 0
    mean_model: MeanModel = "unet"
    domain: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("variables", "units", "mean", "std", "residual_std", "frequencies", "static_extra"):
            setattr(self, name, tuple(getattr(self, name)))
        C = len(self.variables)
        if C == 0:
            raise ValueError("DownscalerMeta: at least one variable is needed")
        for name in ("units", "mean", "std", "residual_std"):
            if len(getattr(self, name)) != C:
                raise ValueError(f"DownscalerMeta: {name} has {len(getattr(self, name))} entries for "
                                 f"{C} variables {list(self.variables)}")
        for name in ("std", "residual_std"):
            vals = getattr(self, name)
            if not all(math.isfinite(v) and v > 0 for v in vals):
                raise ValueError(f"DownscalerMeta: {name} must be positive and finite, got {vals}")
        if int(self.factor) < 1:
            raise ValueError(f"DownscalerMeta: factor must be >= 1, got {self.factor}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"DownscalerMeta: unknown sampler {self.sampler!r}; expected one of {SAMPLERS}")
        if not (math.isfinite(self.inflation) and self.inflation > 0):
            raise ValueError(f"DownscalerMeta: inflation must be positive, got {self.inflation}")
        if int(self.nfe) < 1:
            raise ValueError(f"DownscalerMeta: nfe must be >= 1, got {self.nfe}")
        if self.mean_model not in MEAN_MODELS:
            raise ValueError(f"DownscalerMeta: unknown mean_model {self.mean_model!r}; expected one of "
                             f"{MEAN_MODELS}")
        if int(self.cv_means) < 0 or int(self.cv_means) == 1:
            raise ValueError(f"DownscalerMeta: cv_means must be 0 or at least 2, got {self.cv_means}")
        EDM(self.sigma_min, self.sigma_max, self.sigma_data)  # validates the process

    @property
    def static_channels(self) -> int:
        return 4 * len(self.frequencies) + len(self.static_extra)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "meta") -> DownscalerMeta:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown downscaler metadata keys {unknown}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"{source}: malformed downscaler metadata: {e}") from None


def _mean_stage(meta: DownscalerMeta, given: RegressionNet | LinearMean | Mapping[str, Any] | None
                ) -> RegressionNet | LinearMean:
    """The regression stage ``meta.mean_model`` asks for: ``given`` if it is one, else a new
    ``RegressionNet`` with UNet options ``given`` (a ``LinearMean`` must be given)."""
    C, S = len(meta.variables), meta.static_channels
    if meta.mean_model == "unet":
        if isinstance(given, LinearMean):
            raise ValueError("Downscaler: meta.mean_model is 'unet' but the regression stage is a LinearMean")
        return given if isinstance(given, RegressionNet) else RegressionNet(C, S, given)
    if isinstance(given, LinearMean):
        return given
    raise ValueError("Downscaler: meta.mean_model is 'local_linear': pass regression=LinearMean(...) "
                     "(its grid and radius are not in the metadata)")


class Downscaler(nn.Module):
    """Regression UNet + residual EDM diffusion (CorrDiff, Mardani et al. 2023) with its metadata.

    Args:
        meta: ``DownscalerMeta``.
        regression: ``RegressionNet`` (or UNet options for a new one); for
            ``meta.mean_model == "local_linear"`` a ``LinearMean``.
        diffusion: ``ResidualDenoiser`` (or UNet options for a new one); it is wrapped in
            ``EDMPrecond`` with ``meta.sigma_data`` and sampled through a ``Model(..., "x0")``.
        folds: the ``meta.cv_means`` cross-fitted regression UNets (None: new ones shaped like
            ``regression``). Each was trained without one block of the training period, and the
            diffusion learned the residuals they left on the block they did not see, so members
            built on their means carry the spread between them (CV+, Barber et al. 2021) on top of
            the sampled residual.

    Attributes ``factor``, ``variables``, ``units`` mirror ``meta``.
    """

    def __init__(self, meta: DownscalerMeta,
                 regression: RegressionNet | LinearMean | Mapping[str, Any] | None = None,
                 diffusion: ResidualDenoiser | Mapping[str, Any] | None = None,
                 folds: Sequence[RegressionNet | LinearMean] | None = None) -> None:
        super().__init__()
        self.meta = meta
        C, S = len(meta.variables), meta.static_channels
        regression = _mean_stage(meta, regression)
        if not isinstance(diffusion, ResidualDenoiser):
            diffusion = ResidualDenoiser(C, S, diffusion)
        if regression.channels != C or (diffusion.channels, diffusion.static_channels) != (C, S):
            raise ValueError(f"Downscaler: the networks have {regression.channels} (regression) and "
                             f"{diffusion.channels} (diffusion) channels and {diffusion.static_channels} "
                             f"static channels; the metadata needs {C} and {S}")
        if isinstance(regression, RegressionNet) and regression.static_channels != S:
            raise ValueError(f"Downscaler: the regression network has {regression.static_channels} static "
                             f"channels; the metadata needs {S}")
        self.regression = regression
        if folds is None:
            folds = [type(regression)(**regression.config) for _ in range(int(meta.cv_means))]
        if len(folds) != int(meta.cv_means) or any(f.config != regression.config for f in folds):
            raise ValueError(f"Downscaler: meta.cv_means = {meta.cv_means} needs that many fold models "
                             f"shaped like the regression stage, got {len(folds)}")
        self.folds = nn.ModuleList(folds)
        self.process = EDM(meta.sigma_min, meta.sigma_max, meta.sigma_data)
        self.diffusion = EDMPrecond(diffusion, self.process, meta.sigma_data)
        set_periodic_lon(self, meta.periodic_lon)  # the metadata decides how the convolutions pad

    @property
    def factor(self) -> int:
        return int(self.meta.factor)

    @property
    def variables(self) -> tuple[str, ...]:
        return self.meta.variables

    @property
    def units(self) -> tuple[str, ...]:
        return self.meta.units

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # normalisation -----------------------------------------------------------------------------
    @staticmethod
    def _chan(values: Sequence[float], like: Tensor) -> Tensor:
        # Built from the metadata's Python floats each time, so .to(float32) never rounds the stats.
        return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)

    def normalize(self, x: Tensor) -> Tensor:
        """Physical ``[..., C, H, W]`` -> normalised (``(x - mean) / std`` per channel)."""
        return (x - self._chan(self.meta.mean, x)) / self._chan(self.meta.std, x)

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised ``[..., C, H, W]`` -> physical units."""
        return x * self._chan(self.meta.std, x) + self._chan(self.meta.mean, x)

    def residual_scale(self, like: Tensor) -> Tensor:
        """``residual_std / sigma_data`` as ``[C, 1, 1]``: diffusion space -> normalised units."""
        return self._chan([r / self.meta.sigma_data for r in self.meta.residual_std], like)

    # conditioning ------------------------------------------------------------------------------
    def condition(self, coarse_n: Tensor, static: Tensor | None) -> dict[str, Tensor]:
        """``{"up": bicubic(coarse_n) [B, C, H, W], "static": [B, S, H, W], "coarse": coarse_n}``
        from the normalised coarse field ``[B, C, h, w]`` and static channels ``[B | 1, S, H, W]``
        (``coarse`` only for a ``LinearMean``, which reads it)."""
        up = upsample(coarse_n, self.factor, self.meta.periodic_lon)
        cond = {"up": up}
        if isinstance(self.regression, LinearMean):
            cond["coarse"] = coarse_n
        if self.meta.static_channels:
            cond["static"] = static.to(up.dtype).expand(up.shape[0], -1, -1, -1)
        return cond

    def regression_mean(self, cond: Mapping[str, Tensor]) -> Tensor:
        """Normalised conditional mean ``up + R(cond)`` ``[B, C, H, W]``."""
        return self.regression.mean(cond)

    def member_means(self, cond: Mapping[str, Tensor], members: int) -> Tensor:
        """Normalised mean of each member ``[B, M, C, H, W]``: fold ``m mod K`` for member ``m`` when
        the model has ``K = meta.cv_means`` fold networks, else the regression mean for all."""
        if not len(self.folds):
            return self.regression_mean(cond)[:, None].expand(-1, members, -1, -1, -1)
        used = min(members, len(self.folds))
        fold_mu = torch.stack([f.mean(cond) for f in list(self.folds)[:used]], 1)
        return fold_mu[:, torch.arange(members, device=fold_mu.device) % len(self.folds)]

    def sampling_model(self, cond: Mapping[str, Tensor] | None = None) -> Model:
        """The diffusion network as an engine ``Model`` (EDM process, ``param="x0"``), ``cond`` bound."""
        return Model(self.diffusion, self.process, "x0", cond)

    # prediction --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        coarse: Tensor,
        static: Tensor | None = None,
        *,
        members: int = 16,
        mode: Mode = "diffusion",
        sampler: SamplerName | None = None,
        nfe: int | None = None,
        generator: torch.Generator | None = None,
        conserve: bool = False,
        batch_size: int = 256,
        periodic_lon: bool | None = None,
    ) -> Tensor:
        """Downscale ``coarse [B, C, h, w]`` (physical units) to ``[B, M, C, h f, w f]``.

        ``static [B | 1, S, H, W]`` (``static_features`` of the fine grid; None only for models
        without static channels). ``mode="regression"`` returns the conditional mean (``M = 1``);
        ``"diffusion"`` returns ``members`` samples: the prior is drawn from ``generator`` for all
        members at once (so results do not depend on ``batch_size``, the number of fields per
        network call), then integrated with ``sampler`` (default ``meta.sampler``: Heun's 2nd
        order, Karras et al. 2022 Alg. 1, on the ``edm_rho`` grid) using about ``nfe`` network
        evaluations; the residual is scaled by ``meta.inflation`` and added to the member's mean
        (``member_means``: the fold networks' in turn, if any). ``conserve`` projects every
        member so its block means equal ``coarse`` (``conserve_projection``). ``periodic_lon``
        (None: ``meta.periodic_lon``) says whether the grid wraps in longitude, so a global model runs
        on a regional crop (zero padding) and a regional model on a global grid. Output dtype:
        ``coarse``'s.
        """
        if periodic_lon is not None and bool(periodic_lon) != self.meta.periodic_lon:
            return self._with_periodic(bool(periodic_lon)).predict(
                coarse, static, members=members, mode=mode, sampler=sampler, nfe=nfe,
                generator=generator, conserve=conserve, batch_size=batch_size)
        self._check_predict(coarse, static, members, mode, sampler, nfe, batch_size)
        dt = self.dtype
        x = coarse.to(dt)
        cond = self.condition(self.normalize(x), None if static is None else static.to(dt))
        if mode == "regression":
            out = self.regression_mean(cond)[:, None]
        else:
            r = self._sample_residual(cond, members, sampler or self.meta.sampler, nfe or self.meta.nfe,
                                      generator, batch_size)
            out = self.member_means(cond, members) + r * (self.residual_scale(r) * self.meta.inflation)
        out = self.denormalize(out)
        if conserve:
            out = conserve_projection(out, x[:, None], self.factor)
        return out.to(coarse.dtype)

    def _with_periodic(self, periodic: bool) -> Downscaler:
        """This model with longitude wrapping switched to ``periodic``: a copy of the modules that
        shares every parameter and buffer (cached; never saved)."""
        cache = self.__dict__.setdefault("_periodic_variants", {})
        if periodic not in cache:
            memo = {id(t): t for t in (*self.parameters(), *self.buffers())}
            memo[id(cache)] = {}
            twin = copy.deepcopy(self, memo)
            twin.meta = replace(self.meta, periodic_lon=periodic)
            set_periodic_lon(twin, periodic)
            cache[periodic] = twin
        return cache[periodic]

    def _sample_residual(self, cond: dict[str, Tensor], members: int, sampler: str, nfe: int,
                         generator: torch.Generator | None, batch_size: int) -> Tensor:
        """Residual members ``[B, M, C, H, W]`` in diffusion units."""
        B, C, H, W = cond["up"].shape
        template = State.from_tensor(cond["up"].new_zeros(B * members, C, H, W))
        x_T = self.process.prior(template, generator)["x"]  # member m of field b at row b * M + m
        run, steps = _SAMPLER_FNS[sampler], _steps_for(sampler, nfe)
        grid = edm_rho(self.process, steps)
        out = []
        for start in range(0, B * members, batch_size):
            rows = torch.arange(start, min(start + batch_size, B * members), device=x_T.device)
            c = {k: v[rows // members] for k, v in cond.items()}
            res = run(self.sampling_model(c), State.from_tensor(x_T[rows]), grid)
            out.append(res["x"])
        return torch.cat(out).reshape(B, members, C, H, W)

    def _check_predict(self, coarse, static, members, mode, sampler, nfe, batch_size) -> None:
        if mode not in MODES:
            raise ValueError(f"Downscaler.predict: unknown mode {mode!r}; expected one of {MODES}")
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"Downscaler.predict: unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        if int(members) < 1 or (nfe is not None and int(nfe) < 1) or int(batch_size) < 1:
            raise ValueError("Downscaler.predict: members, nfe and batch_size must be >= 1")
        C, S, f = len(self.variables), self.meta.static_channels, self.factor
        if not isinstance(coarse, Tensor) or coarse.ndim != 4 or coarse.shape[1] != C:
            shape = tuple(coarse.shape) if isinstance(coarse, Tensor) else type(coarse).__name__
            raise ValueError(f"Downscaler.predict: coarse must be a tensor [B, {C}, h, w] "
                             f"(variables {list(self.variables)}), got {shape}")
        bad = int((~torch.isfinite(coarse)).sum())
        if bad:
            raise ValueError(f"Downscaler.predict: coarse input has {bad} NaN/inf values "
                             f"(variables {list(self.variables)}); fill or mask them first")
        B, h, w = coarse.shape[0], coarse.shape[2], coarse.shape[3]
        if S == 0:
            if static is not None and static.shape[1] != 0:
                raise ValueError("Downscaler.predict: this model takes no static channels; pass static=None")
            return
        want = f"[{B} or 1, {S}, {h * f}, {w * f}]"
        if static is None:
            raise ValueError(f"Downscaler.predict: this model needs static channels {want} "
                             f"(static_features(lat, lon, frequencies={list(self.meta.frequencies)}) "
                             "of the fine grid)")
        if static.ndim != 4 or static.shape[0] not in (1, B) or tuple(static.shape[1:]) != (S, h * f, w * f):
            raise ValueError(f"Downscaler.predict: static must be {want}, got {tuple(static.shape)}")


_SAMPLER_FNS = {
    "heun": lambda m, x, g: heun(m, x, g),
    "dpmpp_2m": lambda m, x, g: dpmpp_2m(m, x, g),
    "unipc": lambda m, x, g: unipc(m, x, g),
    "euler": lambda m, x, g: euler(m, x, g),
}


def _steps_for(sampler: str, nfe: int) -> int:
    """Grid steps giving at most ``nfe`` network calls: Heun calls the network twice per step but
    once on the last step into the clean point (``2 n - 1``); the others once per step."""
    return max(1, (int(nfe) + 1) // 2) if sampler == "heun" else int(nfe)


# ------------------------------------------------------------------------------------------------
# save / load (safetensors + JSON, atomic, never pickle)
def save_downscaler(directory: str | os.PathLike, model: Downscaler) -> Path:
    """Write ``model`` to ``directory``: ``downscaler.safetensors`` (the networks' weights, names
    ``regression.*``, ``diffusion.*`` and ``folds.{k}.*``, the last in float16) and
    ``downscaler.json`` (format, network configs, ``DownscalerMeta``), each atomically, the JSON
    last; a shared random save id detects a directory whose two files come from different saves.
    Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    # The fold networks only shift member means, by amounts far above float16's rounding
    # (relative 5e-4); halving their size keeps a 3-fold model under the 20 MB bundle limit.
    # Linear coefficients multiply anomalies of several kelvin, so they stay in full precision.
    def small(k: str, v: Tensor) -> bool:
        return k.startswith("folds.") and v.is_floating_point() and not k.endswith(".coef")

    tensors = {k: (v.half() if small(k, v) else v).detach().cpu().contiguous().clone()
               for k, v in model.state_dict().items()}
    atomic_write(d / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT,
                                                                            "save_id": save_id}))
    doc = {"format": FORMAT, "save_id": save_id, "dtype": str(model.dtype).replace("torch.", ""),
           "regression": model.regression.config, "diffusion": model.diffusion.net.config,
           "meta": model.meta.to_dict()}

    atomic_write_text(d / META_FILE, json.dumps(doc, indent=1))
    return d


def load_downscaler(directory: str | os.PathLike | None = None) -> Downscaler:
    """Read a ``Downscaler`` written by ``save_downscaler`` from ``directory``, or a bundled model by
    name (``BUNDLED``; None: ``"uk_t2m_x4"``). Clear errors name the file and the problem; nothing
    is unpickled."""
    if isinstance(directory, str) and directory in BUNDLED and not Path(directory).exists():
        d = BUNDLED[directory]
    else:
        d = BUNDLED_DIR if directory is None else Path(directory)
    meta_path, w_path = d / META_FILE, d / WEIGHTS_FILE
    if not meta_path.is_file() or not w_path.is_file():
        hint = (" (no bundled checkpoint is installed; train one with sciddiff.climate.train_downscaler "
                "and pass its directory)") if directory is None or d in BUNDLED.values() else ""
        raise FileNotFoundError(f"no downscaler in {d}: need {META_FILE} and {WEIGHTS_FILE}{hint}")
    doc = _read_json(meta_path)
    for key in ("format", "save_id", "regression", "diffusion", "meta"):
        if key not in doc:
            raise ValueError(f"{meta_path}: missing key {key!r}")
    if doc["format"] != FORMAT:
        raise ValueError(f"{meta_path}: unknown format {doc['format']!r} (expected {FORMAT!r})")
    meta = DownscalerMeta.from_dict(doc["meta"], source=str(meta_path))
    try:
        stage = LinearMean if meta.mean_model == "local_linear" else RegressionNet
        model = Downscaler(meta, stage(**doc["regression"]), ResidualDenoiser(**doc["diffusion"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: cannot build the networks: {e}") from None
    tensors, wmeta = _read_safetensors(w_path)
    if wmeta.get("save_id") != doc["save_id"]:
        raise ValueError(f"{d}: {WEIGHTS_FILE} and {META_FILE} come from different saves (interrupted save?)")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"{w_path}: weights do not match the networks in {META_FILE}: {e}") from None
    dtype = getattr(torch, str(doc.get("dtype", "float32")), None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return doc


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
