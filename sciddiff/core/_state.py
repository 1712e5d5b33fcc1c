"""State: named tensor fields, flat-stacked (with a batch index) or dense.

Conventions (as in PyG and MatterGen):
- a *flat* field stacks the elements of variable-size systems along dim 0: ``pos [N_atoms, 3]``
  with ``batch["pos"] [N_atoms]`` giving each row's system index in ``0..B-1``;
- a *dense* field has the system as its leading dim: ``grid [B, C, H, W]``, no batch index.

Arithmetic (``+``, ``-``, ``*``, ``/``) acts field by field; multiplying by a tensor of shape [B]
scales each system, so samplers are written once for every kind of field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from ._constraints import Constraint, Euclidean, Level

_EUCLIDEAN = Euclidean()


class State:
    """Named tensor fields of a batch of ``num_systems`` systems.

    Args:
        data: field name -> tensor; flat fields ``[N_k, ...]``, dense fields ``[B, ...]``.
        batch: field name -> long tensor ``[N_k]`` of system indices, for flat fields only.
        num_systems: B; inferred from a dense field or from ``batch`` when omitted.
        constraints: field name -> where the field lives (default: Euclidean).
    """

    __slots__ = ("data", "batch", "num_systems", "constraints")

    def __init__(
        self,
        data: Mapping[str, Tensor],
        batch: Mapping[str, Tensor] | None = None,
        num_systems: int | None = None,
        constraints: Mapping[str, Constraint] | None = None,
    ) -> None:
        data = dict(data)
        batch = dict(batch or {})
        constraints = dict(constraints or {})
        if not data:
            raise ValueError("State needs at least one field")
        for name in list(batch) + list(constraints):
            if name not in data:
                raise KeyError(f"State: batch index or constraint given for unknown field {name!r}")
        for name, x in data.items():
            if not isinstance(x, Tensor):
                raise TypeError(f"State field {name!r} must be a torch.Tensor, got {type(x)}")
            if x.ndim == 0:
                raise ValueError(f"State field {name!r} must have a leading dim, got a scalar")
        for name, idx in batch.items():
            if idx.ndim != 1 or idx.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"batch index of {name!r} must be a 1-D integer tensor")
            if idx.shape[0] != data[name].shape[0]:
                raise ValueError(
                    f"batch index of {name!r} has {idx.shape[0]} entries but the field has "
                    f"{data[name].shape[0]} rows"
                )
        dense = {k: v.shape[0] for k, v in data.items() if k not in batch}
        if num_systems is None:
            if dense:
                num_systems = next(iter(dense.values()))
            else:
                num_systems = int(max(int(i.max()) + 1 if i.numel() else 0 for i in batch.values()))
        for name, n in dense.items():
            if n != num_systems:
                raise ValueError(f"dense field {name!r} has leading dim {n}, expected {num_systems}")
        for name, idx in batch.items():
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_systems):
                raise ValueError(
                    f"batch index of {name!r} must lie in [0, {num_systems}), got "
                    f"[{int(idx.min())}, {int(idx.max())}]"
                )
        self.data = data
        self.batch = {k: v.long() for k, v in batch.items()}
        self.num_systems = int(num_systems)
        self.constraints = constraints

    # construction ------------------------------------------------------------------------------
    @classmethod
    def from_tensor(cls, x: Tensor, name: str = "x", constraint: Constraint | None = None) -> State:
        """A single dense field ``x [B, ...]``."""
        return cls({name: x}, constraints={name: constraint} if constraint else None)

    def _with(self, data: dict[str, Tensor]) -> State:
        """Same layout, new tensors (no validation: internal fast path)."""
        new = object.__new__(State)
        new.data = data
        new.batch = self.batch
        new.num_systems = self.num_systems
        new.constraints = self.constraints
        return new

    def replace(self, **fields: Tensor) -> State:
        """A copy with some fields replaced (same shapes)."""
        data = dict(self.data)
        for k, v in fields.items():
            if k not in data or v.shape != data[k].shape:
                raise ValueError(f"replace: field {k!r} unknown or of a different shape")
            data[k] = v
        return self._with(data)

    # access ------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self.data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def keys(self):
        return self.data.keys()

    def items(self):
        return self.data.items()

    def constraint(self, name: str) -> Constraint:
        return self.constraints.get(name, _EUCLIDEAN)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.data.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device

    def __repr__(self) -> str:
        parts = []
        for k, v in self.data.items():
            kind = "flat" if k in self.batch else "dense"
            c = type(self.constraint(k)).__name__
            parts.append(f"{k}: {kind} {tuple(v.shape)} {c}")
        return f"State(B={self.num_systems}; " + ", ".join(parts) + ")"

    # per-system broadcasting -------------------------------------------------------------------
    def expand(self, coef: Tensor | float, name: str) -> Tensor | float:
        """Broadcast a per-system coefficient ``[B]`` (or a scalar) against field ``name``."""
        if not isinstance(coef, Tensor) or coef.ndim == 0:
            return coef
        x = self.data[name]
        if name in self.batch:
            coef = coef[self.batch[name]]
        return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))

    def map(self, fn: Callable[[Tensor], Tensor]) -> State:
        return self._with({k: fn(v) for k, v in self.data.items()})

    def __add__(self, other: State) -> State:
        return self._with({k: v + other.data[k] for k, v in self.data.items()})

    def __sub__(self, other: State) -> State:
        return self._with({k: v - other.data[k] for k, v in self.data.items()})

    def __neg__(self) -> State:
        return self._with({k: -v for k, v in self.data.items()})

    def __mul__(self, coef: Tensor | float) -> State:
        return self._with({k: v * self.expand(coef, k) for k, v in self.data.items()})

    __rmul__ = __mul__

    def __truediv__(self, coef: Tensor | float) -> State:
        return self._with({k: v / self.expand(coef, k) for k, v in self.data.items()})

    def lincomb(self, a: Tensor | float, other: State, b: Tensor | float) -> State:
        """``a * self + b * other`` (the samplers' inner loop); python-number ``b`` fuses into
        ``torch.add(..., alpha=b)``, saving a pass over the data."""
        if isinstance(b, (int, float)):
            if isinstance(a, (int, float)) and a == 1:
                return self._with({k: torch.add(v, other.data[k], alpha=b) for k, v in self.data.items()})
            return self._with(
                {k: torch.add(v * self.expand(a, k), other.data[k], alpha=b) for k, v in self.data.items()}
            )
        return self._with(
            {k: v * self.expand(a, k) + other.data[k] * self.expand(b, k) for k, v in self.data.items()}
        )

    # reductions --------------------------------------------------------------------------------
    def per_system_sum(self, values: Mapping[str, Tensor]) -> Tensor:
        """Sum per-element ``values[k]`` (same shape as field k) to one number per system ``[B]``."""
        out = None
        for k, v in values.items():
            flat = v.reshape(v.shape[0], -1).sum(1)
            if k in self.batch:
                s = flat.new_zeros(self.num_systems).index_add_(0, self.batch[k], flat)
            else:
                s = flat
            out = s if out is None else out + s
        return out

    def sqnorm(self) -> Tensor:
        """Squared Euclidean norm of each system over all fields ``[B]``."""
        return self.per_system_sum({k: v.square() for k, v in self.data.items()})

    def dot(self, other: State) -> Tensor:
        """Per-system inner product ``[B]``."""
        return self.per_system_sum({k: v * other.data[k] for k, v in self.data.items()})

    def dof(self) -> Tensor:
        """Degrees of freedom of each system ``[B]`` (float), after constraints."""
        out = torch.zeros(self.num_systems, dtype=self.dtype, device=self.device)
        for k, v in self.data.items():
            out = out + self.constraint(k).dof(v, self.batch.get(k), self.num_systems).to(out)
        return out

    def sizes(self, name: str) -> Tensor:
        """Elements per system of flat field ``name`` ``[B]``."""
        return torch.bincount(self.batch[name], minlength=self.num_systems)

    # constraints -------------------------------------------------------------------------------
    def randn_like(self, generator: torch.Generator | None = None) -> State:
        """Standard normal noise in each field's tangent space (zero-CoM subspace, ...)."""
        out = {}
        for k, v in self.data.items():
            z = torch.randn(v.shape, generator=generator, dtype=v.dtype, device=v.device)
            out[k] = self.constraint(k).project_noise(z, self.batch.get(k), self.num_systems)
        return self._with(out)

    def project(self, level: Level | None = None) -> State:
        """Map the integration variable back onto its constraint (zero CoM, known entries)."""
        return self._with(
            {
                k: self.constraint(k).project(v, self.batch.get(k), self.num_systems, level)
                for k, v in self.data.items()
            }
        )

    def canonical(self) -> State:
        """The canonical representative the model and the user see (torus: wrapped to [0,1))."""
        if not self.constraints:
            return self
        return self._with({k: self.constraint(k).canonical(v) for k, v in self.data.items()})

    def difference(self, other: State) -> State:
        """``self - other`` in each field's geometry (torus: shortest image in [-1/2, 1/2))."""
        return self._with(
            {k: self.constraint(k).difference(v, other.data[k]) for k, v in self.data.items()}
        )

    def check_finite(self, where: str) -> None:
        for k, v in self.data.items():
            # The sum is finite for finite data (one reduction); only if not, look element-wise.
            if not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
                raise FloatingPointError(f"{where}: non-finite values (NaN/Inf) in field {k!r}")

    def to(self, *args, **kwargs) -> State:
        """Fields converted like ``Tensor.to``; batch indices follow a device change (stay long)."""
        new = self._with({k: v.to(*args, **kwargs) for k, v in self.data.items()})
        device = new.device
        if any(i.device != device for i in self.batch.values()):
            new.batch = {k: i.to(device) for k, i in self.batch.items()}
        return new

    def detach(self) -> State:
        return self.map(Tensor.detach)

    def clone(self) -> State:
        return self.map(Tensor.clone)
