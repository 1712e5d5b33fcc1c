"""Training a QM9 molecule generator: a validated config, the data pipeline and ``train_molecules``.

The molecule is two flat fields sharing one batch index (Hoogeboom et al. 2022, "Equivariant
Diffusion for Molecule Generation in 3D" (EDM), Sec. 3): ``"pos" [N, 3]`` in Angstrom with zero
centre of mass (``ZeroCoM``) and ``"h" [N, 5]``, the one-hot atom type (H, C, N, O, F) times
``h_scale`` (EDM: 0.25), diffused as a continuous Gaussian field so every engine sampler applies
unchanged. The process is selected by config and runs through one code path:

- ``"vp"``: variance preserving, eps prediction, EDM's polynomial schedule (or cosine / linear);
- ``"edm"``: Karras et al. 2022 (``EDM`` process, ``EDMPrecond``, x0 prediction, log-normal times);
- ``"flow"``: flow matching on the linear interpolant (Lipman et al. 2023), velocity prediction.

``train_molecules`` drives the engine's ``DiffusionModule`` + ``fit`` (safetensors checkpoints,
resume, EMA, clipping) and writes ``molecule.json``, which ``load_generator`` reads back.
"""

from __future__ import annotations

import json
import math
import os
import time as _time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ..core import (
    EDM,
    VP,
    EDMPrecond,
    GaussianProcess,
    ImportanceTime,
    LinearInterpolant,
    State,
    UniformTime,
    ZeroCoM,
    denoising_loss,
)
from ._config import (
    _MODEL_KEYS,
    MoleculeTrainConfig,
    _backbone_class,
)
from ._generate import MOLECULE_FILE, MOLECULE_FORMAT
from ._io import _atomic_write
from ._types import ATOM_SYMBOLS, ATOMIC_NUMBERS

if TYPE_CHECKING:  # pragma: no cover
    from ._qm9 import QM9Split

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
_ZERO_COM = ZeroCoM()

# ------------------------------------------------------------------------------------------------
class PolynomialVP(GaussianProcess):
    """EDM's "polynomial_2" VP schedule in continuous time (Hoogeboom et al. 2022, App. B):
    ``alpha^2(t) = (1 - 2 s) (1 - t^power)^2 + s``, ``sigma^2 = 1 - alpha^2``, ``t in [0, 1]``.

    EDM discretises ``t`` into 1000 steps and clips per-step ratios of ``alpha^2`` at 0.001, which
    only touches the last step; this continuous form omits the clip. ``s`` (EDM's "precision",
    1e-5 for QM9) keeps ``sigma(0) = sqrt(s) > 0`` and ``alpha(1) = sqrt(s) > 0``.
    """

    def __init__(self, power: float = 2.0, s: float = 1e-5) -> None:
        if power <= 0 or not 0 < s < 0.5:
            raise ValueError("PolynomialVP: need power > 0 and 0 < s < 0.5")
        self.power, self.s = float(power), float(s)
        self.t_min, self.t_max = 0.0, 1.0

    @property
    def config(self) -> dict[str, float]:
        return {"power": self.power, "s": self.s}

    def _alpha2(self, t: Tensor) -> Tensor:
        return (1 - 2 * self.s) * (1 - t.clamp(0, 1) ** self.power) ** 2 + self.s

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sqrt(self._alpha2(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(1 - self._alpha2(t))

    def log_snr(self, t: Tensor) -> Tensor:
        a2 = self._alpha2(t)
        return torch.log(a2) - torch.log1p(-a2)

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        """Exact inverse: ``alpha^2 = sigmoid(lambda)``, then solve for ``t``."""
        u = ((torch.sigmoid(lam) - self.s) / (1 - 2 * self.s)).clamp(0, 1)
        return (1 - torch.sqrt(u)).clamp(0, 1) ** (1 / self.power)

    def __repr__(self) -> str:
        return f"PolynomialVP(power={self.power}, s={self.s})"


# ------------------------------------------------------------------------------------------------
# model
def build_process(config: MoleculeTrainConfig) -> GaussianProcess:
    """The Gaussian process of ``config`` (``PolynomialVP`` / ``VP`` / ``EDM`` / ``LinearInterpolant``)."""
    if config.process == "vp":
        return PolynomialVP() if config.schedule == "polynomial" else VP(schedule=config.schedule)
    if config.process == "edm":
        return EDM(sigma_data=config.sigma_data if config.sigma_data is not None else 0.5)
    return LinearInterpolant()


def build_network(config: MoleculeTrainConfig, process: GaussianProcess) -> nn.Module:
    """The backbone with ``backbone_kwargs``; for ``process="edm"`` wrapped in ``EDMPrecond``
    (Karras et al. 2022, Table 1) with ``config.sigma_data`` (must be resolved)."""
    kwargs = dict(config.backbone_kwargs)
    kwargs.setdefault("h_dim", len(ATOM_SYMBOLS))
    net = _backbone_class(config.backbone)(**kwargs)
    if config.process == "edm":
        if config.sigma_data is None:
            raise ValueError("build_network: resolve sigma_data first (see resolve_config)")
        net = EDMPrecond(net, process, sigma_data=config.sigma_data)
    return net


# ------------------------------------------------------------------------------------------------
# data
#: Atomic number -> type index (H, C, N, O, F -> 0..4); -1 for every other element.
_TYPE_INDEX = torch.full((max(ATOMIC_NUMBERS) + 1,), -1, dtype=torch.long)
_TYPE_INDEX[list(ATOMIC_NUMBERS)] = torch.arange(len(ATOMIC_NUMBERS))


class QM9Dataset(torch.utils.data.Dataset):
    """Molecules of a ``QM9Split`` (flat ``numbers [N_total]``, ``positions [N_total, 3]``, ``ptr
    [M+1]``); item ``i`` is molecule ``i`` as views ``(numbers [n_i], positions [n_i, 3])``.

    ``collate`` stacks a list of items into the engine's ``State`` (see ``collate_molecules``);
    pass it as the DataLoader's ``collate_fn``. ``limit`` keeps the first K molecules.
    """

    def __init__(self, split: QM9Split, *, h_scale: float = 0.25, limit: int | None = None) -> None:
        ptr = split.ptr
        m = ptr.shape[0] - 1
        self.size = m if limit is None else min(int(limit), m)
        end = int(ptr[self.size])
        self.numbers, self.positions = split.numbers[:end], split.positions[:end]
        self.ptr = ptr[: self.size + 1]
        self.h_scale = float(h_scale)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not -self.size <= i < self.size:
            raise IndexError(f"QM9Dataset: index {i} out of range for {self.size} molecules")
        i = i % self.size
        a, b = int(self.ptr[i]), int(self.ptr[i + 1])
        return self.numbers[a:b], self.positions[a:b]

    def num_atoms(self) -> Tensor:
        """Atoms per molecule ``[M]`` (long)."""
        return self.ptr[1:] - self.ptr[:-1]

    def collate(self, items: Sequence[tuple[Tensor, Tensor]]) -> State:
        return collate_molecules(items, self.h_scale)


def collate_molecules(items: Sequence[tuple[Tensor, Tensor]], h_scale: float = 0.25,
                      dtype: torch.dtype = torch.float32) -> State:
    """``[(numbers [n_i], positions [n_i, 3])] * B`` -> ``State`` with flat fields ``"pos" [N, 3]``
    (centred per molecule, constraint ``ZeroCoM``) and ``"h" [N, 5]`` (one-hot H, C, N, O, F times
    ``h_scale``), one shared batch index ``[N]`` (EDM's representation, Hoogeboom et al. 2022)."""
    numbers = torch.cat([it[0] for it in items]).long()
    pos = torch.cat([it[1] for it in items]).to(dtype)
    counts = torch.tensor([it[0].shape[0] for it in items])
    batch = torch.repeat_interleave(torch.arange(len(items)), counts)
    idx = _TYPE_INDEX[numbers.clamp(0, _TYPE_INDEX.shape[0] - 1)]
    bad = (idx < 0) | (numbers >= _TYPE_INDEX.shape[0])
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0])
        raise ValueError(f"collate_molecules: molecule {int(batch[k])} of the batch has atomic number "
                         f"{int(numbers[k])}; the QM9 model knows only {', '.join(ATOM_SYMBOLS)}")
    pos = _ZERO_COM.project(pos, batch, len(items))
    h = torch.nn.functional.one_hot(idx, len(ATOM_SYMBOLS)).to(dtype) * h_scale
    return State({"pos": pos, "h": h}, batch={"pos": batch, "h": batch}, num_systems=len(items),
                 constraints={"pos": _ZERO_COM})


def data_rms(dataset: QM9Dataset, max_molecules: int = 2000) -> float:
    """Root-mean-square of the data over its degrees of freedom (a default ``sigma_data``)."""
    n = min(len(dataset), max_molecules)
    x = collate_molecules([dataset[i] for i in range(n)], dataset.h_scale, torch.float64)
    return float(math.sqrt(float(x.sqnorm().sum() / x.dof().sum())))


def resolve_config(config: MoleculeTrainConfig, dataset: QM9Dataset) -> MoleculeTrainConfig:
    """``config`` with every default made explicit: ``param``, ``weighting``, ``time`` from the
    process and, for ``process="edm"``, ``sigma_data`` from the data (``data_rms``)."""
    sigma_data = config.sigma_data
    if config.process == "edm" and sigma_data is None:
        sigma_data = round(data_rms(dataset), 6)
    return replace(config, param=config.resolved_param, weighting=config.resolved_weighting,
                   time=config.resolved_time, sigma_data=sigma_data)


# ------------------------------------------------------------------------------------------------
# callbacks
class AdaptiveGradClip(pl.Callback):
    """EDM's adaptive gradient clipping (Hoogeboom et al. 2022, code ``utils.gradient_clipping``):
    clip the global gradient norm at ``1.5 * mean + 2 * std`` of the last ``history`` (clipped)
    norms; the history starts with one large value (3000), so early steps are barely clipped.
    The history is not checkpointed: a resumed run starts it afresh."""

    def __init__(self, history: int = 50, initial: float = 3000.0) -> None:
        self.norms: deque[float] = deque([float(initial)], maxlen=history)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        q = np.asarray(self.norms)
        max_norm = float(1.5 * q.mean() + 2 * q.std())
        norm = float(torch.nn.utils.clip_grad_norm_(pl_module.parameters(), max_norm))
        self.norms.append(min(norm, max_norm))


class TrainingLog(pl.Callback):
    """Mean training loss every ``every`` steps and, every ``val_every`` steps, the validation loss
    of the EMA weights on ``val_loader`` (fixed times and noise from ``seed``, so values are
    comparable across evaluations). Records ``{"step", "train_loss", "val_loss", "wall_time_s"}``
    go to ``path`` (JSON list, rewritten atomically; rank 0 only)."""

    def __init__(self, path: Path, every: int, val_loader: Any = None, val_every: int | None = None,
                 records: list[dict[str, Any]] | None = None, wall_offset: float = 0.0,
                 seed: int = 0) -> None:
        self.path, self.every, self.val_loader, self.val_every = path, every, val_loader, val_every
        self.records = list(records or [])
        self.wall_offset, self.seed = wall_offset, seed
        self._sum: Tensor | None = None
        self._count = 0
        self._t0 = _time.perf_counter()

    def wall_time(self) -> float:
        return self.wall_offset + _time.perf_counter() - self._t0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._t0 = _time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if loss is not None:  # summed on the device: no host sync per step
            self._sum = loss.detach() if self._sum is None else self._sum + loss.detach()
            self._count += 1
        step = pl_module.step_count
        val_due = self.val_loader is not None and self.val_every and step % self.val_every == 0
        if step % self.every != 0 and not val_due:
            return
        record: dict[str, Any] = {"step": step}
        if self._count:
            record["train_loss"] = float(self._sum) / self._count
        if val_due:
            record["val_loss"] = validation_loss(pl_module, self.val_loader, self.seed)
            pl_module.log("val/loss", record["val_loss"], rank_zero_only=True)
        record["wall_time_s"] = round(self.wall_time(), 3)
        self._sum, self._count = None, 0
        self.records.append(record)
        if trainer.is_global_zero:
            _write_json(self.path, self.records)


@torch.no_grad()
def validation_loss(module: Any, loader: Any, seed: int = 0) -> float:
    """Mean per-molecule loss of the EMA network (the raw one without EMA) over ``loader``, with
    times and noise drawn from a generator seeded with ``seed``; importance-sampled time is
    replaced by uniform time (the same objective in expectation)."""
    model = module.sampling_model(ema=module.ema is not None)
    # Uniform and log-normal samplers are stateless; the importance sampler's history must not see
    # validation losses.
    time = module.time_sampler
    if isinstance(time, ImportanceTime):
        time = UniformTime(module.process)
    gen = torch.Generator(device=module.device).manual_seed(seed)
    total, count = 0.0, 0
    for batch in loader:
        x0 = module.to_state(batch.to(module.device))
        out = denoising_loss(model, x0, time=time, weighting=module.weighting,
                             sigma_data=module.sigma_data, generator=gen)
        total += float(out.per_system.sum())
        count += x0.num_systems
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------------
def train_molecules(config: MoleculeTrainConfig | str | os.PathLike, out_dir: str | os.PathLike, *,
                    resume: bool = True, progress: bool = True,
                    trainer_kwargs: Mapping[str, Any] | None = None) -> Path:
    """Train a QM9 molecule generator (EDM's recipe, Hoogeboom et al. 2022, through the engine).

    Writes into ``out_dir``: the engine checkpoint (``model.safetensors``, ``optimizer.safetensors``,
    ``state.json``; every ``checkpoint_every`` steps and at the end), ``config.json`` (the config
    with every default resolved), ``history.json`` (losses) and ``molecule.json`` (atom types,
    ``h_scale``, the training set's atom-count histogram, process, recommended sampler, training
    budget). ``load_generator(out_dir)`` reads it back.

    Args:
        config: a ``MoleculeTrainConfig`` or the path of a JSON config (see ``configs/``).
        out_dir: output directory (created).
        resume: continue from the checkpoint in ``out_dir`` (same model keys required); False
            starts afresh and overwrites it.
        progress: show Lightning's progress bar.
        trainer_kwargs: extra ``pl.Trainer`` arguments, e.g. ``{"accelerator": "gpu", "devices":
            4, "strategy": "ddp"}`` for multi-GPU data parallelism, ``{"precision": "bf16-mixed"}``;
            they override the defaults here (no logger, no model summary, clipping from config).

    Returns: ``out_dir`` as a ``Path``.
    """
    from pytorch_lightning.utilities import rank_zero_only

    from ..training import fit
    from ._qm9 import load_qm9

    if not isinstance(config, MoleculeTrainConfig):
        config = MoleculeTrainConfig.from_json(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    dataset = QM9Dataset(load_qm9(config.split, cache_dir=config.cache_dir), h_scale=config.h_scale,
                         limit=config.limit)
    config = resolve_config(config, dataset)
    budget = _check_resume(out, config).get("training", {}) if resume else {}
    done = _checkpoint_step(out) if resume else 0
    records = [r for r in _read_history(out / HISTORY_FILE) if r.get("step", 0) <= done] if resume else []
    # Wall time so far: the last record up to the checkpoint (an interrupted run wrote no budget).
    wall = float(records[-1]["wall_time_s"]) if records else float(budget.get("wall_time_s", 0.0))
    sizes = dataset.num_atoms().tolist()
    if rank_zero_only.rank == 0:  # molecule.json first: load_generator works from the first checkpoint
        _write_json(out / CONFIG_FILE, config.to_dict())
        _write_json(out / MOLECULE_FILE, molecule_info(config, sizes, done, wall, budget.get("device"),
                                                       budget.get("devices", 1)))
    val_loader = None
    if config.val_every is not None:
        val = QM9Dataset(load_qm9("valid", cache_dir=config.cache_dir), h_scale=config.h_scale,
                         limit=config.val_molecules)
        val_loader = _loader(val, config.batch_size, False, 0)
    log = TrainingLog(out / HISTORY_FILE, config.log_every, val_loader, config.val_every, records, wall,
                      config.seed)
    module = build_module(config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # validation runs in TrainingLog (EMA weights, fixed noise), not in Lightning's loop
        warnings.filterwarnings("ignore", message=".*validation_step.*no `val_dataloader`.*")
        trainer = fit(module, _loader(dataset, config.batch_size, True, config.num_workers),
                      max_steps=config.max_steps, ckpt_dir=out, resume=resume,
                      every_n_steps=config.checkpoint_every, enable_progress_bar=progress,
                      trainer_kwargs=_trainer_kwargs(config, out, log, trainer_kwargs))
    if trainer is not None and trainer.is_global_zero:
        _write_json(out / HISTORY_FILE, log.records)
        _write_json(out / MOLECULE_FILE, molecule_info(config, sizes, module.step_count, log.wall_time(),
                                                       _device_description(trainer), trainer.world_size))
    return out


def build_module(config: MoleculeTrainConfig) -> Any:
    """The engine's ``DiffusionModule`` for a resolved ``config`` (see ``resolve_config``)."""
    from ..training import DiffusionModule

    process = build_process(config)
    return DiffusionModule(
        build_network(config, process), process, config.resolved_param, weighting=config.resolved_weighting,
        time=config.resolved_time, time_kwargs=config.time_kwargs, sigma_data=config.sigma_data,
        lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
        ema_decay=config.ema_decay,
    )


def _trainer_kwargs(config: MoleculeTrainConfig, out: Path, log: TrainingLog,
                    user: Mapping[str, Any] | None) -> dict[str, Any]:
    """Quiet defaults, clipping from ``config``, then the user's ``pl.Trainer`` arguments on top."""
    kw: dict[str, Any] = {"logger": False, "enable_model_summary": False, "default_root_dir": str(out)}
    if isinstance(config.grad_clip, float):
        kw["gradient_clip_val"] = config.grad_clip
    kw.update(user or {})
    adaptive = [AdaptiveGradClip()] if config.grad_clip == "adaptive" else []
    kw["callbacks"] = [log, *adaptive, *list(kw.pop("callbacks", None) or [])]
    return kw


def molecule_info(config: MoleculeTrainConfig, num_atoms: Sequence[int], steps: int = 0,
                  wall_time_s: float = 0.0, device: str | None = None, devices: int = 1) -> dict[str, Any]:
    """The ``molecule.json`` record: what ``load_generator`` needs beyond the engine checkpoint.
    ``num_atoms``: the atom count of every training molecule (for the size histogram)."""
    from ._convert import NumAtomsDistribution

    return {
        "format": MOLECULE_FORMAT,
        "atom_types": list(ATOM_SYMBOLS),
        "atomic_numbers": list(ATOMIC_NUMBERS),
        "h_scale": config.h_scale,
        "num_atoms": NumAtomsDistribution(list(num_atoms)).to_dict(),
        "process": config.process,
        "param": config.resolved_param,
        "sampler": {"name": config.sampler, "nfe": config.nfe, "grid": config.grid},
        "training": {"dataset": "qm9", "split": config.split, "molecules": len(num_atoms),
                     "steps": int(steps), "batch_size": config.batch_size,
                     "wall_time_s": round(float(wall_time_s), 3), "device": device,
                     "devices": int(devices), "torch": torch.__version__},
    }


def _loader(dataset: QM9Dataset, batch_size: int, shuffle: bool, workers: int) -> Any:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       collate_fn=dataset.collate, num_workers=workers,
                                       persistent_workers=workers > 0)


def _check_resume(out: Path, config: MoleculeTrainConfig) -> dict[str, Any]:
    """The previous ``molecule.json`` (or {}); a ``ValueError`` where ``out`` holds a model with
    other model keys (architecture, process, ...) than ``config``."""
    old_cfg = out / CONFIG_FILE
    if old_cfg.is_file():
        old = MoleculeTrainConfig.from_json(old_cfg)
        diff = [k for k in _MODEL_KEYS if getattr(old, k) != getattr(config, k)]
        if diff:
            changes = ", ".join(f"{k}: {getattr(old, k)!r} -> {getattr(config, k)!r}" for k in diff)
            raise ValueError(f"{out}: cannot resume, the model there differs ({changes}); use another "
                             "out_dir or resume=False to start afresh")
    info = out / MOLECULE_FILE
    return json.loads(info.read_text()) if info.is_file() else {}


def _checkpoint_step(out: Path) -> int:
    state = out / "state.json"
    if not state.is_file():
        return 0
    try:
        return int(json.loads(state.read_text())["global_step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(f"{state}: not a sciddiff checkpoint state (no global_step)") from None


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return records if isinstance(records, list) else []


def _device_description(trainer: Any) -> str:
    dev = trainer.strategy.root_device
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} x{trainer.world_size}"
    return f"{dev.type} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _write_json(path: Path, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")

    _atomic_write(path, write)
