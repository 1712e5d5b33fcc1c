"""A thin PyTorch-Lightning module over the engine's ``denoising_loss``."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ..core import (
    EDM,
    GaussianProcess,
    ImportanceTime,
    LogNormalTime,
    LossOutput,
    Model,
    Param,
    State,
    UniformTime,
    denoising_loss,
)
from ..core._losses import Coupling, Weighting
from ._checkpoint import (
    Checkpoint,
    load_checkpoint,
    network_config,
    network_from_config,
    process_config,
    process_from_config,
    set_rng_state,
)
from ._ema import EMA

TimeKind = Literal["uniform", "lognormal", "importance"]
TimeSampler = UniformTime | LogNormalTime | ImportanceTime
_TIME_CLASSES: dict[str, type] = {
    "uniform": UniformTime, "lognormal": LogNormalTime, "importance": ImportanceTime,
}
_TIME_ATTRS: dict[str, tuple[str, ...]] = {
    "uniform": ("eps",), "lognormal": ("p_mean", "p_std"), "importance": ("bins", "history", "uniform_prob"),
}


class DiffusionModule(pl.LightningModule):
    """Train ``net`` as a denoiser for ``process`` in parameterization ``param``.

    ``training_step`` turns the batch into a ``State`` (a ``State`` as is; a dict of dense tensors
    ``{name: [B, ...]}``; a tensor ``[B, ...]``, or a 1-tuple/list holding one as yielded by
    ``TensorDataset``, becomes the dense field ``field``; ``{"x": data, "cond": {name: Tensor[B, ...]}}``
    trains a conditional network ``net(x, t, cond)``), casts floating fields to the module's
    dtype, and minimises ``sciddiff.core.denoising_loss`` (drawing times and noise from the global
    torch RNG: seed with ``pl.seed_everything``). The loss is logged as ``train/loss``.

    Optimisation: AdamW (Loshchilov & Hutter 2019) on all network parameters with a linear learning
    rate warmup ``lr * min(1, (n + 1) / warmup_steps)`` at optimizer step ``n`` (Goyal et al.
    2017). Gradient clipping is the Trainer's: ``pl.Trainer(gradient_clip_val=1.0)`` (norm
    clipping; ``gradient_clip_algorithm="value"`` for value clipping), or ``fit(...,
    trainer_kwargs={"gradient_clip_val": 1.0})``.

    EMA: with ``ema_decay`` set, an ``EMA`` of the weights is updated after every optimizer step
    (Song & Ermon 2020; Karras et al. 2024); ``sampling_model(ema=True)`` samples with it.

    The module keeps its own optimizer-step counter ``step_count`` (Lightning's ``global_step``
    restarts with every Trainer); checkpoints and resumes go through ``save_checkpoint`` /
    ``fit`` (safetensors + JSON), never Lightning's pickle ``.ckpt``.

    Args:
        net: ``net(x: State, t: Tensor[B]) -> State``, e.g. ``MLPDenoiser`` (optionally inside
            ``EDMPrecond`` with ``param="x0"``).
        process: the Gaussian process (VP, VE, EDM, LinearInterpolant).
        param: what ``net`` predicts: ``"eps"``, ``"x0"``, ``"v"``, ``"score"`` or ``"velocity"``.
        weighting: ``"simple"`` (native-space MSE; Ho et al. 2020), ``"min_snr"`` (Hang et al.
            2023) or ``"edm"`` (Karras et al. 2022).
        time: time sampler, ``"uniform"``, ``"lognormal"`` (EDM's; Karras et al. 2022) or
            ``"importance"`` (Nichol & Dhariwal 2021), or a sampler instance for ``process``.
        time_kwargs: constructor arguments for a named sampler (e.g. ``{"p_mean": -1.2}``).
        coupling: ``"independent"`` or ``"ot"`` (minibatch OT; Tong et al. 2024).
        sigma_data: data std for the EDM weighting (default: ``process.sigma_data`` for EDM, else 0.5).
        lr, weight_decay, betas: AdamW settings.
        warmup_steps: linear learning-rate warmup length (0: none).
        ema_decay: EMA decay (None: no EMA).
        ema_warmup: use the ``min(decay, (1 + n) / (10 + n))`` EMA warmup.
        field: field name for batches given as plain tensors.
    """

    def __init__(
        self,
        net: nn.Module,
        process: GaussianProcess,
        param: Param = "eps",
        *,
        weighting: Weighting = "simple",
        time: TimeKind | TimeSampler = "uniform",
        time_kwargs: Mapping[str, Any] | None = None,
        coupling: Coupling = "independent",
        sigma_data: float | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        ema_decay: float | None = 0.999,
        ema_warmup: bool = True,
        field: str = "x",
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError("DiffusionModule: net must be a torch.nn.Module")
        if weighting not in ("simple", "min_snr", "edm"):
            raise ValueError(f"DiffusionModule: unknown weighting {weighting!r}")
        if coupling not in ("independent", "ot"):
            raise ValueError(f"DiffusionModule: unknown coupling {coupling!r}")
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0:
            raise ValueError("DiffusionModule: need lr > 0, weight_decay >= 0, warmup_steps >= 0")
        self.net = net
        self.process, self.param = process, param
        self.model = Model(net, process, param)  # validates param
        self.time_sampler, self._time_cfg = _make_time_sampler(time, time_kwargs, process)
        self.weighting, self.coupling = weighting, coupling
        if sigma_data is None:
            sigma_data = process.sigma_data if isinstance(process, EDM) else 0.5
        self.sigma_data = float(sigma_data)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.warmup_steps = int(warmup_steps)
        self.ema = EMA(net, ema_decay, ema_warmup) if ema_decay is not None else None
        self.field = field
        self.step_count = 0
        self._epoch_offset = 0  # epochs completed before this fit (restored from a checkpoint)
        self._epochs_started = 0
        self._batches_in_epoch = 0
        self._pending_optimizer_state: dict[str, Any] | None = None
        self._pending_rng_state: dict[str, Any] | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    # configuration -----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-serialisable configuration (what ``state.json`` stores under ``config``)."""
        return {
            "process": process_config(self.process),
            "param": self.param,
            "network": network_config(self.net),
            "loss": {"weighting": self.weighting, "time": self._time_cfg, "coupling": self.coupling,
                     "sigma_data": self.sigma_data},
            "optim": {"lr": self.lr, "weight_decay": self.weight_decay, "betas": list(self.betas),
                      "warmup_steps": self.warmup_steps},
            "ema": None if self.ema is None else {"decay": self.ema.decay, "warmup": self.ema.warmup},
            "field": self.field,
        }

    @staticmethod
    def kwargs_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor keyword arguments (besides ``net`` and ``process``) from ``config()``."""
        loss, optim, ema = cfg["loss"], cfg["optim"], cfg.get("ema")
        return {
            "param": cfg["param"], "weighting": loss["weighting"], "time": loss["time"]["kind"],
            "time_kwargs": loss["time"]["kwargs"], "coupling": loss["coupling"],
            "sigma_data": loss["sigma_data"], "lr": optim["lr"], "weight_decay": optim["weight_decay"],
            "betas": tuple(optim["betas"]), "warmup_steps": optim["warmup_steps"],
            "ema_decay": None if ema is None else ema["decay"],
            "ema_warmup": True if ema is None else ema["warmup"], "field": cfg.get("field", "x"),
        }

    def epoch_position(self) -> tuple[int, int]:
        """``(epochs completed, batches done in the current epoch)`` over all resumed runs.

        Counted by the module itself (``on_train_epoch_start``, ``training_step``) so it does not
        depend on Lightning's loop state, which a fresh Trainer resets.
        """
        if self._epochs_started <= self._epoch_offset:
            return self._epoch_offset, 0
        trainer = self._trainer
        n = trainer.num_training_batches if trainer is not None else float("inf")
        if self._batches_in_epoch >= n:
            return self._epochs_started, 0
        return self._epochs_started - 1, self._batches_in_epoch

    # data --------------------------------------------------------------------------------------
    def to_state(self, batch: Any) -> State:
        """Batch -> State with floating fields in the module's dtype (see class docstring)."""
        if isinstance(batch, (list, tuple)) and len(batch) == 1:
            batch = batch[0]
        if isinstance(batch, State):
            x = batch
        elif isinstance(batch, Tensor):
            x = State.from_tensor(batch, self.field)
        elif isinstance(batch, Mapping):
            x = State(batch)
        else:
            raise TypeError(
                "DiffusionModule: a batch must be a State, a tensor [B, ...] or a dict of tensors, "
                f"got {type(batch)}"
            )
        dtype = self.dtype
        if any(v.is_floating_point() and v.dtype != dtype for v in x.data.values()):
            x = x._with({k: v.to(dtype) if v.is_floating_point() else v for k, v in x.data.items()})
        return x

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, Mapping) and "cond" in batch:
            return {"x": self.transfer_batch_to_device(batch["x"], device, dataloader_idx),
                    "cond": {k: v.to(device) for k, v in batch["cond"].items()}}
        if isinstance(batch, State):
            # State.to moves the fields only; move the batch indices too.
            return State({k: v.to(device) for k, v in batch.data.items()},
                         batch={k: v.to(device) for k, v in batch.batch.items()},
                         num_systems=batch.num_systems, constraints=batch.constraints)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # training ----------------------------------------------------------------------------------
    def split_cond(self, batch: Any) -> tuple[Any, dict[str, Tensor] | None]:
        """``{"x": data, "cond": {name: Tensor[B, ...]}}`` -> (data, cond); other batches -> (batch, None)."""
        if isinstance(batch, Mapping) and "cond" in batch:
            if set(batch) != {"x", "cond"} or not isinstance(batch["cond"], Mapping):
                raise ValueError(
                    "DiffusionModule: a conditional batch must be {'x': data, 'cond': {name: tensor}}, "
                    f"got keys {sorted(batch)}"
                )
            dtype = self.dtype
            cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch["cond"].items()}
            return batch["x"], cond
        return batch, None

    def compute_loss(self, batch: Any) -> LossOutput:
        """``denoising_loss`` on one batch (a ``LossOutput``: ``loss`` scalar, ``per_system [B]``)."""
        data, cond = self.split_cond(batch)
        x0 = self.to_state(data)
        return denoising_loss(self.model, x0, time=self.time_sampler, weighting=self.weighting,
                              coupling=self.coupling, sigma_data=self.sigma_data, cond=cond)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._batches_in_epoch += 1
        out = self.compute_loss(batch)
        self.log("train/loss", out.loss.detach(), on_step=True, prog_bar=True,
                 batch_size=out.per_system.shape[0])
        return out.loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self.compute_loss(batch)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=out.per_system.shape[0], sync_dist=True)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, betas=self.betas,
                                weight_decay=self.weight_decay)
        if self._pending_optimizer_state is not None:  # restored from a checkpoint
            opt.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None
        elif self._optimizer is not None:  # a later fit of the same module: continue, don't reset
            opt.load_state_dict(self._optimizer.state_dict())
        self._optimizer = opt
        return opt

    def learning_rate(self, step: int) -> float:
        """Learning rate at optimizer step ``step`` (0-based), with the linear warmup."""
        if self.warmup_steps <= 0:
            return self.lr
        return self.lr * min(1.0, (step + 1) / self.warmup_steps)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Any = None) -> None:
        lr = self.learning_rate(self.step_count)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step(closure=optimizer_closure)
        self.step_count += 1
        if self.ema is not None:
            self.ema.update(self.net)

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
        self._epochs_started = self._epoch_offset
        self._batches_in_epoch = 0

    def on_train_epoch_start(self) -> None:
        # RNG states from a checkpoint are applied here, right before the epoch's data iterator is
        # created (from the second epoch on, Lightning makes it after this hook), so a resumed run
        # draws the same permutation and noise as an uninterrupted one.
        if self._pending_rng_state is not None:
            set_rng_state(self._pending_rng_state)
            self._pending_rng_state = None
        self._epochs_started += 1
        self._batches_in_epoch = 0

    def current_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer made by the last ``configure_optimizers`` (None before training)."""
        return self._optimizer

    def extra_state_tensors(self) -> dict[str, Tensor]:
        """Training tensors other than weights and optimizer (the importance sampler's history)."""
        if isinstance(self.time_sampler, ImportanceTime):
            return {"time_sampler.losses": self.time_sampler._losses.clone(),
                    "time_sampler.count": self.time_sampler._count.clone()}
        return {}

    # checkpoints -------------------------------------------------------------------------------
    def load_training_state(self, ckpt: Checkpoint, *, optimizer: bool = True) -> None:
        """Restore network, EMA, step counter, sampler history and (``optimizer``) the optimizer
        state (applied when the Trainer next calls ``configure_optimizers``).

        Raises ``ValueError`` where the checkpoint was trained for another process or
        parameterization (loss and optimiser options may differ: fine-tuning)."""
        cfg, mine = ckpt.config, self.config()
        for key in ("process", "param"):
            if cfg.get(key) != mine[key]:
                raise ValueError(
                    f"checkpoint {key} {cfg.get(key)!r} does not match the module's {mine[key]!r}"
                )
        self.net.load_state_dict(ckpt.network)
        if self.ema is not None:
            if ckpt.ema is not None:
                self.ema.load_state_dict(ckpt.ema, (ckpt.state.get("ema") or {}).get("num_updates", 0))
            else:
                self.ema = EMA(self.net, self.ema.decay, self.ema.warmup)
        if isinstance(self.time_sampler, ImportanceTime) and "time_sampler.losses" in ckpt.extra:
            self.time_sampler._losses.copy_(ckpt.extra["time_sampler.losses"])
            self.time_sampler._count.copy_(ckpt.extra["time_sampler.count"])
        if optimizer:
            self._pending_optimizer_state = ckpt.optimizer
        self.step_count = ckpt.global_step
        self._epoch_offset = self._epochs_started = int(ckpt.state.get("epoch", 0))
        self._batches_in_epoch = 0

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, net: nn.Module | None = None,
                        process: GaussianProcess | None = None) -> DiffusionModule:
        """A module rebuilt from a checkpoint for inference (network and EMA weights, step).

        ``net``: an instance of the trained architecture (weights are overwritten); optional where
        the network recorded its constructor kwargs (``MLPDenoiser``, ``EDMPrecond`` around it).
        ``process``: default, rebuilt from ``state.json``. The optimizer state is not loaded
        (``fit`` does that when resuming).
        """
        ckpt = load_checkpoint(directory)
        cfg = ckpt.config
        process = process if process is not None else process_from_config(cfg["process"])
        if net is None:
            if cfg.get("network") is None:
                raise ValueError("from_checkpoint: the checkpoint does not record how to build the "
                                 "network; pass net=")
            net = network_from_config(cfg["network"], process)
        module = cls(net, process, **cls.kwargs_from_config(cfg))
        module.load_training_state(ckpt, optimizer=False)
        return module

    # sampling ----------------------------------------------------------------------------------
    def sampling_model(self, ema: bool = True) -> Model:
        """A ``Model`` for the samplers around a snapshot (deep copy, eval mode, no grad) of the
        network, with the EMA weights loaded where ``ema`` (an error if the module has no EMA)."""
        if ema and self.ema is None:
            raise ValueError("sampling_model(ema=True): this module has no EMA (ema_decay=None)")
        net = copy.deepcopy(self.net)
        if ema:
            self.ema.copy_to(net)
        net.eval().requires_grad_(False)
        return Model(net, self.process, self.param)


def _make_time_sampler(time: Any, kwargs: Mapping[str, Any] | None,
                       process: GaussianProcess) -> tuple[TimeSampler, dict[str, Any]]:
    if isinstance(time, str):
        if time not in _TIME_CLASSES:
            raise ValueError(
                f"DiffusionModule: unknown time sampler {time!r}; expected {tuple(_TIME_CLASSES)}"
            )
        kw = dict(kwargs or {})
        sampler = _TIME_CLASSES[time](process, **kw)
        return sampler, {"kind": time, "kwargs": kw}
    for kind, cls in _TIME_CLASSES.items():
        if type(time) is cls:
            if kwargs:
                raise ValueError("DiffusionModule: time_kwargs only with a named time sampler")
            if time.process is not process:
                raise ValueError("DiffusionModule: the time sampler was made for another process")
            return time, {"kind": kind, "kwargs": {a: getattr(time, a) for a in _TIME_ATTRS[kind]}}
    raise TypeError(f"DiffusionModule: time must be one of {tuple(_TIME_CLASSES)} or such a sampler")
