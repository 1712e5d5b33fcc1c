"""The molecule generator's training options (``MoleculeTrainConfig``): validated at construction,
read from JSON or a bundled preset, with errors that name the file and the key (``ConfigError``)."""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
import types
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from torch import nn

from ..core import ImportanceTime, LogNormalTime, UniformTime
from ._generate import GridName, SamplerName
from ._types import ATOM_SYMBOLS

Backbone = Literal["egnn", "e3nn"]
ProcessName = Literal["vp", "edm", "flow"]
Schedule = Literal["polynomial", "cosine", "linear"]
ParamName = Literal["eps", "x0", "v", "score", "velocity"]
WeightingName = Literal["simple", "min_snr", "edm"]
TimeName = Literal["uniform", "lognormal", "importance"]
Split = Literal["train", "valid", "test"]

#: Per-process defaults for ``param``, ``weighting`` and ``time`` when the config leaves them None.
_PROCESS_DEFAULTS: dict[str, dict[str, str]] = {
    "vp": {"param": "eps", "weighting": "simple", "time": "uniform"},
    "edm": {"param": "x0", "weighting": "edm", "time": "lognormal"},
    "flow": {"param": "velocity", "weighting": "simple", "time": "uniform"},
}
_TIME_CLASSES: dict[str, type] = {"uniform": UniformTime, "lognormal": LogNormalTime,
                                  "importance": ImportanceTime}
#: Keys that define the trained model: a resume must not change them.
_MODEL_KEYS = ("backbone", "backbone_kwargs", "process", "schedule", "param", "h_scale", "sigma_data")


class ConfigError(ValueError):
    """An invalid ``MoleculeTrainConfig``: ``"<source>: key '<key>': <problem>"``, where ``key`` names
    the offending field (None for a file that is not a JSON object) and ``source`` the file."""

    def __init__(self, key: str | None, problem: str, source: str | os.PathLike | None = None) -> None:
        where = f"{source}: " if source is not None else ""
        super().__init__(where + (f"key {key!r}: " if key is not None else "") + problem)
        self.key, self.problem, self.source = key, problem, source


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoleculeTrainConfig:
    """Everything ``train_molecules`` needs; validated at construction (``ConfigError``).

    Model: ``backbone`` (``"egnn"``: ``EGNNDenoiser``, ``"e3nn"``: ``E3Denoiser``) built with
    ``backbone_kwargs``; ``process`` (``"vp"``, ``"edm"``, ``"flow"``) with ``schedule`` (VP only);
    ``param``, ``weighting``, ``time`` (None: the process's default, see ``_PROCESS_DEFAULTS``) and
    ``time_kwargs``; ``sigma_data`` (EDM preconditioning; None: the RMS of the training data);
    ``h_scale`` multiplies the one-hot atom types (EDM: 0.25).

    Optimisation: AdamW ``lr``, ``weight_decay`` (EDM: 1e-12), ``warmup_steps``, ``batch_size``
    molecules, ``max_steps`` optimizer steps in total, ``ema_decay`` (None: no EMA), ``grad_clip``
    (a max norm, ``"adaptive"`` for EDM's rule, or None), ``seed``.

    Data: ``split`` of QM9, ``limit`` (first K molecules; for tests), ``cache_dir`` for ``load_qm9``,
    ``num_workers`` of the DataLoader.

    Bookkeeping: ``checkpoint_every`` steps, ``log_every`` steps (mean train loss into
    ``history.json``), ``val_every`` steps (None: never) on the first ``val_molecules`` of the
    validation split, and the recommended ``sampler`` / ``nfe`` / ``grid`` written to
    ``molecule.json``.
    """

    backbone: Backbone = "egnn"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    process: ProcessName = "vp"
    schedule: Schedule = "polynomial"
    param: ParamName | None = None
    weighting: WeightingName | None = None
    time: TimeName | None = None
    time_kwargs: dict[str, Any] = field(default_factory=dict)
    sigma_data: float | None = None
    h_scale: float = 0.25
    lr: float = 1e-4
    weight_decay: float = 1e-12
    warmup_steps: int = 0
    batch_size: int = 64
    max_steps: int = 200_000
    ema_decay: float | None = 0.999
    grad_clip: float | Literal["adaptive"] | None = "adaptive"
    seed: int = 0
    split: Split = "train"
    limit: int | None = None
    cache_dir: str | None = None
    num_workers: int = 0
    checkpoint_every: int = 1000
    log_every: int = 100
    val_every: int | None = None
    val_molecules: int = 1000
    sampler: SamplerName = "dpmpp_2m"
    nfe: int = 50
    grid: GridName = "default"

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, _check_type(f.name, getattr(self, f.name), hints[f.name]))
        self._check_values()
        self._check_kwargs()

    def _check_values(self) -> None:
        positive = ("h_scale", "lr", "batch_size", "max_steps", "checkpoint_every", "log_every",
                    "val_molecules", "nfe")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ConfigError(key, f"must be > 0, got {getattr(self, key)!r}")
        for key in ("weight_decay", "warmup_steps", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)!r}")
        for key in ("sigma_data", "limit", "val_every"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ConfigError(key, f"must be > 0 or null, got {getattr(self, key)!r}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1) or null, got {self.ema_decay!r}")
        if isinstance(self.grad_clip, float) and not self.grad_clip > 0:
            raise ConfigError("grad_clip", f"must be > 0, 'adaptive' or null, got {self.grad_clip!r}")
        if self.process == "edm" and self.resolved_param != "x0":
            raise ConfigError("param", "process 'edm' trains EDMPrecond, which predicts x0: use 'x0'")

    def _check_kwargs(self) -> None:
        """Constructor keywords must fit the backbone and the time sampler (fail early, clearly)."""
        cls = _backbone_class(self.backbone)
        _check_json("backbone_kwargs", self.backbone_kwargs)
        _check_json("time_kwargs", self.time_kwargs)
        try:
            inspect.signature(cls).bind_partial(**self.backbone_kwargs)
        except TypeError as e:
            raise ConfigError("backbone_kwargs", f"{cls.__name__}: {e}") from None
        if self.backbone_kwargs.get("h_dim", len(ATOM_SYMBOLS)) != len(ATOM_SYMBOLS):
            raise ConfigError("backbone_kwargs", f"h_dim must be {len(ATOM_SYMBOLS)} (H, C, N, O, F)")
        try:
            inspect.signature(_TIME_CLASSES[self.resolved_time]).bind(None, **self.time_kwargs)
        except TypeError as e:
            raise ConfigError("time_kwargs", f"time sampler {self.resolved_time!r}: {e}") from None

    # defaults that depend on the process ------------------------------------------------------
    @property
    def resolved_param(self) -> str:
        return self.param or _PROCESS_DEFAULTS[self.process]["param"]

    @property
    def resolved_weighting(self) -> str:
        return self.weighting or _PROCESS_DEFAULTS[self.process]["weighting"]

    @property
    def resolved_time(self) -> str:
        return self.time or _PROCESS_DEFAULTS[self.process]["time"]

    # JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoleculeTrainConfig:
        """From a JSON object; unknown keys raise ``ConfigError`` (with a close match if any)."""
        if not isinstance(data, Mapping):
            raise ConfigError(None, f"expected a JSON object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(str(key), f"unknown key{hint}; known keys: {', '.join(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MoleculeTrainConfig:
        """Read a config file; errors name the file and the key (``ConfigError``)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise FileNotFoundError(f"{path}: cannot read the config file ({e.strerror})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(None, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                              path) from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(e.key, e.problem, path) from None

    @classmethod
    def preset(cls, name: Literal["cpu", "edm", "gpu"]) -> MoleculeTrainConfig:
        """A bundled preset from ``sciddiff/molecules/configs/<name>.json``."""
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; available: {presets}")
        return cls.from_json(PRESET_DIR / f"{name}.json")


PRESET_DIR = Path(__file__).parent / "configs"


def _check_json(key: str, value: Mapping[str, Any]) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(key, f"must be JSON-serialisable ({e})") from None


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against a type hint built from ``Literal``, ``int``, ``float``, ``str``,
    ``dict`` and ``None`` unions; ints are accepted (and converted) where a float is expected."""
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return None
        if get_origin(opt) is Literal and isinstance(value, str) and value in get_args(opt):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(key, f"must be a finite number, got {value!r}")
            return float(value)
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is str and isinstance(value, str):
            return value
        if get_origin(opt) is dict and isinstance(value, Mapping):
            if not all(isinstance(k, str) for k in value):
                raise ConfigError(key, "must be an object with string keys")
            return dict(value)
    allowed = []
    for opt in options:
        if get_origin(opt) is Literal:
            allowed.append(" | ".join(repr(a) for a in get_args(opt)))
        else:
            allowed.append({type(None): "null", dict: "object"}.get(get_origin(opt) or opt,
                                                                    getattr(opt, "__name__", str(opt))))
    raise ConfigError(key, f"expected {' or '.join(allowed)}, got {value!r}")


def _backbone_class(name: str) -> type[nn.Module]:
    if name == "egnn":
        from ._egnn import EGNNDenoiser

        return EGNNDenoiser
    from ._e3nn import E3Denoiser

    return E3Denoiser
