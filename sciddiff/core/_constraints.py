"""Where a field lives: R^n, the zero-centre-of-mass subspace, the flat torus, or with known entries.

Each constraint gives the samplers four operations:
- ``project_noise``: put Gaussian noise into the tangent space (EDM's (N-1)*3 subspace);
- ``project``: map the integration variable back after each step (exact for linear subspaces and
  masks; the identity on the torus, whose dynamics run on the covering space R^d);
- ``canonical``: the representative shown to models, callbacks and users (torus: wrapped);
- ``difference``: ``a - b`` in the field's geometry (torus: the shortest image).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Level:
    """Noise level of the current iterate: ``x_t = alpha * x_0 + sigma * eps``.

    ``alpha`` and ``sigma`` are 0-d tensors (one level for every system) or shape [B].
    """

    alpha: Tensor | float
    sigma: Tensor | float


class Constraint:
    """Base class: Euclidean space, all operations trivial."""

    #: True where the field is only defined with ``alpha(t) == 1`` (variance-exploding) processes.
    needs_variance_exploding: bool = False

    def project_noise(self, z: Tensor, batch: Tensor | None, num_systems: int) -> Tensor:
        return z

    def project(
        self, x: Tensor, batch: Tensor | None, num_systems: int, level: Level | None = None
    ) -> Tensor:
        return x

    def canonical(self, x: Tensor) -> Tensor:
        return x

    def difference(self, a: Tensor, b: Tensor) -> Tensor:
        return a - b

    def dof(self, x: Tensor, batch: Tensor | None, num_systems: int) -> Tensor:
        """Degrees of freedom per system ``[B]``."""
        per_row = x[0].numel() if x.shape[0] else 0
        if batch is None:
            return torch.full((num_systems,), float(per_row))
        return torch.bincount(batch, minlength=num_systems).float() * per_row

    def prior(self, z: Tensor, sigma: Tensor | float, batch: Tensor | None, num_systems: int) -> Tensor:
        """A draw from the prior ``N(0, sigma^2)`` restricted to this space, from standard ``z``."""
        return self.project_noise(z, batch, num_systems) * sigma


class Euclidean(Constraint):
    """Plain R^n."""


def _segment_mean(x: Tensor, batch: Tensor | None, num_systems: int) -> Tensor:
    """Mean over the elements of each system; returns one row per element (same shape as x)."""
    if batch is None:  # dense [B, N, d]: mean over the element dim
        if x.ndim != 3:
            raise ValueError(f"ZeroCoM: a field without a batch index must be dense [B, N, d], got shape "
                             f"{tuple(x.shape)}; flat fields [N_total, d] need their batch index")
        return x.mean(dim=1, keepdim=True).expand_as(x)
    sums = x.new_zeros((num_systems, *x.shape[1:])).index_add_(0, batch, x)
    counts = torch.bincount(batch, minlength=num_systems).clamp(min=1).to(x.dtype)
    return (sums / counts.reshape(-1, *([1] * (x.ndim - 1))))[batch]


class ZeroCoM(Constraint):
    """Positions whose centre of mass (unweighted mean) is zero in every system.

    Noise and prior live in the (N-1)*d dimensional subspace (Hoogeboom et al. 2022, EDM, Sec. 3).
    Flat fields ``[N_atoms, d]`` use their batch index; dense fields ``[B, N, d]`` the element dim.
    """

    def project_noise(self, z: Tensor, batch: Tensor | None, num_systems: int) -> Tensor:
        return z - _segment_mean(z, batch, num_systems)

    def project(
        self, x: Tensor, batch: Tensor | None, num_systems: int, level: Level | None = None
    ) -> Tensor:
        return x - _segment_mean(x, batch, num_systems)

    def dof(self, x: Tensor, batch: Tensor | None, num_systems: int) -> Tensor:
        d = x.shape[-1]
        return (super().dof(x, batch, num_systems) - d).clamp(min=0)  # an empty system has none


def _wrap01(x: Tensor) -> Tensor:
    """``x mod 1`` in [0, 1): ``remainder(-tiny, 1)`` rounds to exactly 1.0, folded back to 0."""
    r = torch.remainder(x, 1.0)
    return torch.where(r >= 1.0, r - 1.0, r)


class FlatTorus(Constraint):
    """Fractional coordinates on [0,1)^d (DiffCSP, Jiao et al. 2023).

    Noise is wrapped: ``x_t = wrap(x_0 + sigma * eps)``, valid only for processes with
    ``alpha == 1``. Samplers integrate on the covering space R^d; models and users see the
    wrapped value, and the score is the wrapped-normal score (see ``wrapped_normal_score``).
    The prior is uniform on the torus (the wrapped normal's limit for large sigma).
    """

    needs_variance_exploding = True

    def canonical(self, x: Tensor) -> Tensor:
        return _wrap01(x)

    def difference(self, a: Tensor, b: Tensor) -> Tensor:
        return _wrap01(a - b + 0.5) - 0.5

    def prior(self, z: Tensor, sigma: Tensor | float, batch: Tensor | None, num_systems: int) -> Tensor:
        # Uniform on [0,1): the probability-integral transform of z keeps generator reproducibility.
        return torch.special.ndtr(z)


class Masked(Constraint):
    """Known entries held fixed (inpainting / conditioning), the rest governed by ``inner``.

    After each step the known entries are reset to ``alpha * known + sigma * noise`` at the current
    level: with a fixed ``noise`` this is the exact probability-flow trajectory of a point mass at
    ``known`` (the replacement method, Song et al. 2021, App. I.2).

    Args:
        mask: bool tensor, same shape as the field; True where the value is known.
        known: the known values (only read where ``mask``).
        noise: fixed standard-normal noise for the known entries (same shape as the field).
        inner: constraint for the unknown entries.
    """

    def __init__(
        self, mask: Tensor, known: Tensor, noise: Tensor, inner: Constraint | None = None
    ) -> None:
        if mask.dtype != torch.bool:
            raise TypeError("Masked: mask must be a bool tensor")
        if mask.shape != known.shape or known.shape != noise.shape:
            raise ValueError(
                f"Masked: mask {tuple(mask.shape)}, known {tuple(known.shape)} and noise "
                f"{tuple(noise.shape)} must have the same shape"
            )
        if isinstance(inner, FlatTorus):
            raise ValueError("Masked: known entries on the torus are not supported")
        self.mask, self.known, self.noise = mask, known, noise
        self.inner = inner or Euclidean()

    @classmethod
    def create(
        cls, mask: Tensor, known: Tensor, generator: torch.Generator | None = None,
        inner: Constraint | None = None,
    ) -> Masked:
        noise = torch.randn(known.shape, generator=generator, dtype=known.dtype, device=known.device)
        return cls(mask, known, noise, inner)

    def project_noise(self, z: Tensor, batch: Tensor | None, num_systems: int) -> Tensor:
        return self.inner.project_noise(z, batch, num_systems)

    def _follow(self, x: Tensor) -> None:
        """Move the stored tensors to ``x``'s device and dtype (once; e.g. after ``State.to``)."""
        if self.known.device != x.device or self.known.dtype != x.dtype:
            self.mask = self.mask.to(x.device)
            self.known, self.noise = self.known.to(x), self.noise.to(x)

    def project(
        self, x: Tensor, batch: Tensor | None, num_systems: int, level: Level | None = None
    ) -> Tensor:
        self._follow(x)
        x = self.inner.project(x, batch, num_systems, level)
        if level is None:
            return torch.where(self.mask, self.known, x)
        a = _broadcast_level(level.alpha, x, batch)
        s = _broadcast_level(level.sigma, x, batch)
        return torch.where(self.mask, a * self.known + s * self.noise, x)

    def prior(self, z: Tensor, sigma: Tensor | float, batch: Tensor | None, num_systems: int) -> Tensor:
        return self.inner.prior(z, sigma, batch, num_systems)

    def dof(self, x: Tensor, batch: Tensor | None, num_systems: int) -> Tensor:
        known = self.mask.reshape(self.mask.shape[0], -1).sum(1).to(torch.float32)
        if batch is not None:  # on the mask's device (a CPU accumulator fails for CUDA fields)
            known = known.new_zeros(num_systems).index_add_(0, batch.to(known.device), known)
        return self.inner.dof(x, batch, num_systems).to(known) - known


def _broadcast_level(c: Tensor | float, x: Tensor, batch: Tensor | None) -> Tensor | float:
    if not isinstance(c, Tensor) or c.ndim == 0:
        return c
    if batch is not None:
        c = c[batch]
    return c.reshape(c.shape[0], *([1] * (x.ndim - 1)))
