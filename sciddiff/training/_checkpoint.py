"""Checkpoints as safetensors + JSON (never pickle), a Lightning callback, and resumable ``fit``.

A checkpoint directory holds three files, each written atomically (a temporary file in the same
directory, flushed and fsync'ed, then ``os.replace``), ``state.json`` last:

- ``model.safetensors``: the network's ``state_dict`` under its own names and the EMA shadow
  weights under ``"ema." + name``;
- ``optimizer.safetensors``: the optimizer's per-parameter tensors as ``"state.<index>.<key>"``
  (e.g. ``state.0.exp_avg``) and other training tensors as ``"extra.<name>"`` (the loss history of
  ``ImportanceTime``);
- ``state.json``: global step, epoch, the module's configuration (process kind and constructor
  arguments, parameterization, loss options, optimiser settings, network class path and
  constructor kwargs where the network exposes a ``config``, EMA decay), the optimizer's
  ``param_groups`` and non-tensor state, and the RNG states of torch, numpy and ``random``.

Every file records the step and a random save id, so ``load_checkpoint`` detects a directory
whose files come from different saves (a crash between two replaces).

Lightning's own ``.ckpt`` files are pickles; ``fit`` turns them off (``enable_checkpointing=False``)
and resumes from these files instead.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .._atomic import atomic_write, atomic_write_text
from ..core import EDM, VE, VP, EDMPrecond, GaussianProcess, LinearInterpolant

if TYPE_CHECKING:
    from ._module import DiffusionModule

FORMAT = "sciddiff-checkpoint/1"
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
EMA_PREFIX = "ema."


# ------------------------------------------------------------------------------------------------
# configuration <-> objects
def _class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(path: str, base: type) -> Any:
    """The class at ``path``, which must subclass ``base`` (a JSON file names only classes of an
    expected kind: no arbitrary callables)."""
    module, _, name = path.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise TypeError(f"checkpoint config: {path} is not a {base.__name__} subclass")
    return obj


def process_config(process: GaussianProcess) -> dict[str, Any]:
    """``{"kind", "class", "kwargs"}`` from which ``process_from_config`` rebuilds the process.

    Known processes (VP, VE, EDM, LinearInterpolant) record their constructor arguments; another
    process records ``process.config`` if it has one (a JSON dict of kwargs), else no kwargs.
    """
    if isinstance(process, VP):
        kw = {"schedule": process.schedule, "timesteps": process.timesteps, "beta_min": process.beta_min,
              "beta_max": process.beta_max, "cosine_s": process.cosine_s}
        if process.timesteps is None:
            kw["t_min"] = process.t_min
    elif isinstance(process, VE):
        kw = {"sigma_min": process.sigma_min, "sigma_max": process.sigma_max}
    elif isinstance(process, EDM):
        kw = {"sigma_min": process.sigma_min, "sigma_max": process.sigma_max,
              "sigma_data": process.sigma_data}
    elif isinstance(process, LinearInterpolant):
        kw = {}
    else:
        kw = dict(getattr(process, "config", None) or {})
    return {"kind": type(process).__name__, "class": _class_path(process), "kwargs": kw}


def process_from_config(cfg: dict[str, Any]) -> GaussianProcess:
    """Inverse of ``process_config``."""
    return _import(cfg["class"], GaussianProcess)(**cfg.get("kwargs", {}))


def network_config(net: torch.nn.Module) -> dict[str, Any] | None:
    """``{"class", "kwargs"}`` for a network exposing ``config`` (a JSON dict of constructor
    kwargs, as ``MLPDenoiser``), ``EDMPrecond`` around such a network, else None."""
    if isinstance(net, EDMPrecond):
        inner = network_config(net.net)
        if inner is None:
            return None
        return {"class": _class_path(net), "kwargs": {"sigma_data": net.sigma_data}, "inner": inner}
    cfg = getattr(net, "config", None)
    if not isinstance(cfg, dict):
        return None
    try:
        json.dumps(cfg)
    except TypeError:
        return None
    return {"class": _class_path(net), "kwargs": cfg}


def network_from_config(cfg: dict[str, Any], process: GaussianProcess) -> torch.nn.Module:
    """Inverse of ``network_config`` (``process`` for ``EDMPrecond`` and networks taking one)."""
    cls = _import(cfg["class"], torch.nn.Module)
    kwargs = dict(cfg["kwargs"])
    if cls is EDMPrecond:
        return EDMPrecond(network_from_config(cfg["inner"], process), process, **kwargs)
    if isinstance(kwargs.get("process"), dict):
        kwargs["process"] = process_from_config(kwargs["process"])
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# RNG state (JSON lists)
def rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), numpy and ``random`` states as JSON-serialisable lists."""
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
        "numpy": [np_state[0], np.asarray(np_state[1]).tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if state.get("numpy") is not None:
        n = state["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if state.get("python") is not None:
        p = state["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


# ------------------------------------------------------------------------------------------------
# optimizer state <-> named tensors
def flatten_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into named tensors ``state.<index>.<key>`` and a JSON part
    ``{"param_groups": [...], "scalars": {index: {key: value}}}``."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"state.{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_optimizer_state``: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()  # safetensors refuses shared storage (tied weights): store a copy
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    tensors = out
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _save_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(obj))


def _load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out, meta


# ------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns.

    Attributes:
        network: the network's state dict (name -> tensor).
        ema: EMA shadow weights (parameter name -> tensor), or None.
        optimizer: a dict for ``torch.optim.Optimizer.load_state_dict``, or None.
        extra: other training tensors (e.g. ``"time_sampler.losses"``).
        state: the parsed ``state.json`` (``global_step``, ``epoch``, ``config``, ``ema``, ``rng``...).
    """

    network: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    optimizer: dict[str, Any] | None
    extra: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def global_step(self) -> int:
        return int(self.state["global_step"])

    @property
    def config(self) -> dict[str, Any]:
        return self.state["config"]


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """True where ``directory`` holds a complete checkpoint (``state.json`` is written last)."""
    d = Path(directory)
    return (d / STATE_FILE).is_file() and (d / MODEL_FILE).is_file()


def save_checkpoint(directory: str | os.PathLike, module: DiffusionModule, *,
                    include_optimizer: bool = True, include_rng: bool = True) -> Path:
    """Write ``module`` (network, EMA, optimizer, step, config, RNG) to ``directory``; returns it.

    Each file is replaced atomically; ``state.json`` goes last. Call on one rank only.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    step = int(module.step_count)
    save_id = uuid.uuid4().hex
    meta = {"format": FORMAT, "global_step": str(step), "save_id": save_id}

    tensors = dict(module.net.state_dict())
    clash = [k for k in tensors if k.startswith(EMA_PREFIX)]
    if clash and module.ema is not None:
        raise ValueError(f"save_checkpoint: network keys {clash[:3]} clash with the EMA prefix "
                         f"{EMA_PREFIX!r}")
    if module.ema is not None:
        for k, v in module.ema.state_dict().items():
            tensors[EMA_PREFIX + k] = v
    _save_tensors(d / MODEL_FILE, tensors, meta)

    opt_json = None
    opt = module.current_optimizer() if include_optimizer else None
    opt_tensors: dict[str, Tensor] = {}
    if opt is not None:
        opt_tensors, opt_json = flatten_optimizer_state(opt.state_dict())
    for k, v in module.extra_state_tensors().items():
        opt_tensors["extra." + k] = v
    _save_tensors(d / OPTIMIZER_FILE, opt_tensors, meta)

    epoch, batch_in_epoch = module.epoch_position()
    state = {
        "format": FORMAT,
        "global_step": step,
        "save_id": save_id,
        "epoch": int(epoch),
        "batch_in_epoch": int(batch_in_epoch),
        "config": module.config(),
        "ema": None if module.ema is None else {"decay": module.ema.decay, "warmup": module.ema.warmup,
                                                "num_updates": module.ema.num_updates},
        "optimizer": opt_json,
        "rng": rng_state() if include_rng else None,
    }
    _save_json(d / STATE_FILE, state)
    return d


def load_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint`` (no pickle anywhere)."""
    d = Path(directory)
    if not has_checkpoint(d):
        raise FileNotFoundError(f"no sciddiff checkpoint in {d} (need {MODEL_FILE} and {STATE_FILE})")
    with open(d / STATE_FILE) as f:
        state = json.load(f)
    if state.get("format") != FORMAT:
        raise ValueError(f"{d / STATE_FILE}: unknown format {state.get('format')!r}")
    step, save_id = str(state["global_step"]), state.get("save_id")

    def check(name: str, meta: dict[str, str]) -> None:
        if meta.get("global_step") != step or meta.get("save_id") != save_id:
            raise ValueError(f"{d}: {name} (step {meta.get('global_step')}) and state.json (step {step}) "
                             "come from different saves (interrupted save?)")

    tensors, meta = _load_tensors(d / MODEL_FILE)
    check(MODEL_FILE, meta)
    network = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)} or None
    optimizer, extra = None, {}
    if (d / OPTIMIZER_FILE).is_file():
        opt_tensors, ometa = _load_tensors(d / OPTIMIZER_FILE)
        check(OPTIMIZER_FILE, ometa)
        extra = {k[6:]: v for k, v in opt_tensors.items() if k.startswith("extra.")}
        opt_tensors = {k: v for k, v in opt_tensors.items() if k.startswith("state.")}
        if state.get("optimizer") is not None:
            optimizer = unflatten_optimizer_state(opt_tensors, state["optimizer"])
    return Checkpoint(network=network, ema=ema, optimizer=optimizer, extra=extra, state=state)



ExportDtype = Literal["float32", "float16", "bfloat16"]


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: ExportDtype = "float32",
                      ema: bool = True) -> Path:
    """An inference-only copy of the checkpoint in ``src``, written to ``dst``; returns ``dst``.

    The EMA weights (``ema`` and present; else the raw ones) become the network's weights, floating
    tensors are stored as ``dtype`` (half precision halves the file; loading casts back to the
    model's float32 parameters), and the optimizer and RNG states are dropped. The result loads with
    ``DiffusionModule.from_checkpoint``; resuming training from it restarts the optimizer and EMA.
    """
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"export_checkpoint: dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"export_checkpoint: {dst} is the source checkpoint; export to another directory")
    ckpt = load_checkpoint(src)
    weights = dict(ckpt.network)
    if ema and ckpt.ema is not None:
        weights.update(ckpt.ema)
    weights = {k: v.to(dtypes[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
    d = Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    _save_tensors(d / MODEL_FILE, weights, {"format": FORMAT, "global_step": str(ckpt.global_step),
                                            "save_id": save_id, "dtype": dtype})
    (d / OPTIMIZER_FILE).unlink(missing_ok=True)  # a stale one would fail the save-id check
    state = {**ckpt.state, "save_id": save_id, "ema": None, "optimizer": None, "rng": None,
             "exported": {"dtype": dtype, "weights": "ema" if ema and ckpt.ema is not None else "raw"}}
    _save_json(d / STATE_FILE, state)
    return d

# ------------------------------------------------------------------------------------------------
class SafetensorsCheckpoint(pl.Callback):
    """Save a ``DiffusionModule`` to ``dirpath`` every ``every_n_steps`` optimizer steps (counted by
    the module's own ``step_count``, which survives resumes) and at the end of training.

    Only global rank 0 writes; all ranks then meet at a barrier. The directory holds the latest
    checkpoint (files replaced atomically).
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError("SafetensorsCheckpoint: every_n_steps must be >= 1 or None")
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps
        self.last_saved_step: int | None = None

    def _save(self, trainer: pl.Trainer, module: DiffusionModule) -> None:
        if self.last_saved_step == module.step_count:
            return
        if trainer.is_global_zero:
            save_checkpoint(self.dirpath, module)
        self.last_saved_step = module.step_count
        trainer.strategy.barrier("sciddiff_checkpoint")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        n = self.every_n_steps
        if n is not None and pl_module.step_count > 0 and pl_module.step_count % n == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module)


def _start_at_epoch(trainer: pl.Trainer, epoch: int) -> None:
    """Make a fresh Trainer count epochs from ``epoch`` (so ``DistributedSampler.set_epoch`` and
    ``current_epoch`` continue where the checkpoint left off). Only touches the public progress
    counters of the fit loop; skipped where they are absent."""
    if epoch <= 0:
        return
    progress = getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None)
    if progress is None:
        return
    for tracker in (progress.current, progress.total):
        for attr in ("ready", "started", "processed", "completed"):
            if hasattr(tracker, attr):
                setattr(tracker, attr, epoch)


def fit(
    module: DiffusionModule,
    train_dataloaders: Iterable[Any],
    *,
    max_steps: int,
    ckpt_dir: str | os.PathLike | None = None,
    resume: bool = True,
    every_n_steps: int | None = None,
    restore_rng: bool = True,
    enable_progress_bar: bool | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> pl.Trainer | None:
    """Train ``module`` to a total of ``max_steps`` optimizer steps, resuming from ``ckpt_dir``.

    If ``resume`` and ``ckpt_dir`` holds a checkpoint, restores network, EMA, optimizer state, the
    importance-sampler history, the step counter and (``restore_rng``) the RNG states, then trains
    only the remaining ``max_steps - step`` steps with a fresh ``pl.Trainer``. Lightning's pickle
    checkpoints are disabled; a ``SafetensorsCheckpoint(ckpt_dir, every_n_steps)`` is added.
    Calling ``fit`` again on the same module (larger ``max_steps``) continues training, with the
    optimizer state carried over.

    Exactness: the RNG states (torch, numpy, ``random``) saved with the checkpoint are restored
    at the start of the first epoch, just before the epoch's data iterator is created, and the
    Trainer's epoch counter continues from the checkpoint's (``DistributedSampler.set_epoch``).
    So when the checkpoint was taken at the end of an epoch (and the seed, data loader and
    hardware are the same), the resumed run reproduces the uninterrupted one bit for bit: same
    shuffles, same times and noise, same weights. A checkpoint taken mid-epoch resumes with a
    fresh pass over that epoch (a fresh Trainer cannot continue a half-consumed data iterator,
    and Lightning's own loop state lives in its pickle checkpoints): statistically equivalent,
    not identical. Checkpoint at epoch ends (``every_n_steps`` a multiple of the epoch length)
    where exact resumes matter.

    Under DDP (``strategy="ddp"`` re-runs the script on every rank) each rank restores the same
    checkpoint, including rank 0's RNG state (so ranks share it, as after ``seed_everything``).
    Prefer ``"ddp"`` to ``"ddp_spawn"``: with spawn, training happens in child processes, so the
    calling process's module does not get the EMA or step counter back (and Lightning ships the
    weights back through a temporary ``torch.save`` file).

    Args:
        module: the ``DiffusionModule`` (weights are replaced when resuming).
        train_dataloaders: what ``Trainer.fit`` accepts (batches of State, dict or ``[B, d]`` tensors).
        max_steps: total optimizer steps, counting those already in the checkpoint.
        ckpt_dir: checkpoint directory (None: no checkpointing, no resume).
        every_n_steps: periodic saves (None: only at the end).
        enable_progress_bar: passed to the Trainer (False silences it).
        trainer_kwargs: other ``pl.Trainer`` arguments (``accelerator``, ``devices``, ``strategy``,
            ``gradient_clip_val``, ``logger``, ...); ``max_steps`` and checkpointing are set here.

    Returns: the Trainer, or None where the checkpoint is already at ``max_steps``.
    """
    kw = dict(trainer_kwargs or {})
    for bad in ("max_steps", "enable_checkpointing"):
        if kw.get(bad) not in (None, False):
            raise ValueError(f"fit: {bad} is set by fit (got {bad}={kw[bad]!r})")
        kw.pop(bad, None)
    if enable_progress_bar is not None:
        kw["enable_progress_bar"] = enable_progress_bar
    rng = None
    if ckpt_dir is not None and resume and has_checkpoint(ckpt_dir):
        ckpt = load_checkpoint(ckpt_dir)
        module.load_training_state(ckpt)
        rng = ckpt.state.get("rng") if restore_rng else None
    remaining = max_steps - module.step_count
    if remaining <= 0:
        return None
    start_epoch = module.epoch_position()[0]
    module._epoch_offset = module._epochs_started = start_epoch
    module._batches_in_epoch = 0
    if rng is None and restore_rng and start_epoch > 0:
        rng = rng_state()  # continuing in-process: undo the draws of the Trainer's setup
    module._pending_rng_state = rng  # applied at the first epoch start
    callbacks = list(kw.pop("callbacks", None) or [])
    if ckpt_dir is not None and not any(isinstance(c, SafetensorsCheckpoint) for c in callbacks):
        callbacks.append(SafetensorsCheckpoint(ckpt_dir, every_n_steps))
    kw.setdefault("max_epochs", -1)
    trainer = pl.Trainer(max_steps=remaining, enable_checkpointing=False, callbacks=callbacks, **kw)
    _start_at_epoch(trainer, start_epoch)
    trainer.fit(module, train_dataloaders)
    return trainer
