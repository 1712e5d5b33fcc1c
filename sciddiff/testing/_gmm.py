"""Exact-score testbed: distributions whose marginals under every Gaussian process are known.

- ``GaussianMixture``: ``sum_k w_k N(mu_k, diag(s_k^2))``. Under ``x_t = alpha x_0 + sigma eps``
  component k becomes ``N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))``, so density, score,
  denoiser and velocity are closed form; with one component the probability-flow ODE is too.
- ``WrappedNormalMixture``: the same on the flat torus [0,1)^d under variance-exploding noise.
- ``ZeroCoMGaussian``: isotropic Gaussian point clouds on the zero-centre-of-mass subspace.

``ExactDenoiser`` turns any of them into a network (``net(x: State, t) -> State``) for a process
and parameterization, so samplers can be tested against exact answers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core import FlatTorus, GaussianProcess, State, ZeroCoM, from_prediction


class GaussianMixture:
    """``sum_k w_k N(mu_k, diag(s_k^2))`` in R^d.

    Args:
        means: ``[K, d]``.
        stds: ``[K]`` (isotropic) or ``[K, d]`` (diagonal), positive.
        weights: ``[K]``, positive (normalised here); default equal.
    """

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None) -> None:
        if means.ndim != 2:
            raise ValueError(f"GaussianMixture: means must be [K, d], got {tuple(means.shape)}")
        K, d = means.shape
        stds = torch.as_tensor(stds, dtype=means.dtype)
        if stds.ndim == 0:
            stds = stds.expand(K)
        if stds.ndim == 1:
            stds = stds[:, None].expand(K, d)
        if stds.shape != (K, d) or not bool((stds > 0).all()):
            raise ValueError("GaussianMixture: stds must be positive, of shape [K] or [K, d]")
        self.means, self.stds = means, stds.clone()
        self.weights = _normalised_weights(weights, K, means.dtype)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, dtype: torch.dtype) -> GaussianMixture:
        return GaussianMixture(self.means.to(dtype), self.stds.to(dtype), self.weights.to(dtype))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``[n, d]``."""
        k = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k] * z

    def _parts(self, x: Tensor, alpha, sigma) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component log-densities ``[n, K]``, variances ``[K, d]`` (n, K, d broadcast)."""
        a = _col(alpha, x)
        s = _col(sigma, x)
        mu = self.means.to(x)[None] * a[..., None]                      # [n|1, K, d]
        var = (a[..., None] * self.stds.to(x)[None]) ** 2 + s[..., None] ** 2
        diff = x[:, None, :] - mu
        logp = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        return logp + torch.log(self.weights.to(x)), diff, var

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """Log-density of the marginal at level (alpha, sigma), ``x [n, d] -> [n]``."""
        logp, _, _ = self._parts(x, alpha, sigma)
        return torch.logsumexp(logp, dim=1)

    def responsibilities(self, x: Tensor, alpha=1.0, sigma=0.0) -> Tensor:
        """Posterior component probabilities ``[n, K]``."""
        logp, _, _ = self._parts(x, alpha, sigma)
        return torch.softmax(logp, dim=1)

    def score(self, x: Tensor, alpha=1.0, sigma=0.0) -> Tensor:
        """``grad_x log p_t(x)`` ``[n, d]``."""
        logp, diff, var = self._parts(x, alpha, sigma)
        r = torch.softmax(logp, dim=1)
        return -(r[..., None] * diff / var).sum(1)

    def denoise(self, x: Tensor, alpha=1.0, sigma=0.0) -> Tensor:
        """``E[x_0 | x_t = x]`` ``[n, d]`` (Tweedie)."""
        logp, diff, var = self._parts(x, alpha, sigma)
        r = torch.softmax(logp, dim=1)
        a = _col(alpha, x)[..., None]
        gain = a * self.stds.to(x)[None] ** 2 / var          # [n|1, K, d]
        return (r[..., None] * (self.means.to(x)[None] + gain * diff)).sum(1)

    def eps(self, x: Tensor, alpha, sigma) -> Tensor:
        """``E[eps | x_t = x] = -sigma * score``."""
        return -_col(sigma, x) * self.score(x, alpha, sigma)

    def pf_ode_solution(self, x: Tensor, level_from: tuple, level_to: tuple) -> Tensor:
        """Closed-form PF-ODE map of a single Gaussian from ``(alpha, sigma)`` to another level.

        The flow keeps each coordinate's standardised value: ``x = alpha mu + sqrt(alpha^2 sd^2 +
        sigma^2) z`` with ``z`` constant along the path (valid also where alpha = 0).
        """
        if self.means.shape[0] != 1:
            raise ValueError("pf_ode_solution is closed form only for a single Gaussian")
        (a0, s0), (a1, s1) = level_from, level_to
        mu, sd = self.means[0].to(x), self.stds[0].to(x)
        z = (x - a0 * mu) / torch.sqrt(a0**2 * sd**2 + s0**2)
        return a1 * mu + torch.sqrt(a1**2 * sd**2 + s1**2) * z


def _normalised_weights(weights: Tensor | None, k: int, dtype: torch.dtype) -> Tensor:
    w = torch.ones(k, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
    if w.shape != (k,) or not bool((w > 0).all()):
        raise ValueError(f"mixture weights must be positive, of shape [{k}]")
    return w / w.sum()


def _col(c, x: Tensor) -> Tensor:
    """A level as a column ``[n|1, 1]`` against ``x [n, d]``."""
    c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    return c.reshape(-1, 1) if c.ndim else c.reshape(1, 1)


def ring_mixture(k: int = 8, radius: float = 2.0, std: float = 0.05, dtype=torch.float64) -> GaussianMixture:
    """``k`` equal components on a circle of ``radius`` in 2-D (the ``gmm2d`` benchmark problem)."""
    ang = torch.arange(k, dtype=dtype) * 2 * math.pi / k
    return GaussianMixture(radius * torch.stack([ang.cos(), ang.sin()], 1), std)


def random_mixture(k: int = 8, dim: int = 64, std: float = 0.05, seed: int = 1,
                   dtype=torch.float64) -> GaussianMixture:
    """``k`` equal components with means ``N(0, I)`` drawn with ``seed`` (the ``gmm64d`` problem)."""
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture(torch.randn(k, dim, generator=g, dtype=torch.float64).to(dtype), std)


class WrappedNormalMixture:
    """``sum_k w_k prod_j WN(x_j; m_kj, s_k^2)`` on [0,1)^d; under ``x_t = wrap(x_0 + sigma eps)``
    the variance becomes ``s_k^2 + sigma^2``. ``images`` periodic images are summed each way."""

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None,
                 images: int = 4) -> None:
        K, d = means.shape
        stds = torch.as_tensor(stds, dtype=means.dtype)
        self.means = torch.remainder(means, 1.0)
        self.stds = stds.expand(K).clone() if stds.ndim == 0 else stds
        self.weights, self.images = _normalised_weights(weights, K, means.dtype), images

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return torch.remainder(self.means[k] + self.stds[k, None] * z, 1.0)

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """Log-density on the torus (w.r.t. Lebesgue measure on [0,1)^d), ``[n, d] -> [n]``."""
        s = _col(sigma, x)                                            # [n|1, 1]
        var = self.stds.to(x)[None] ** 2 + s**2                        # [n|1, K]
        k = torch.arange(-self.images, self.images + 1, dtype=x.dtype, device=x.device)
        diff = x[:, None, :, None] - self.means.to(x)[None, :, :, None] + k   # [n, K, d, I]
        v = var[..., None, None]
        lp = -0.5 * diff**2 / v - 0.5 * torch.log(2 * math.pi * v)
        per_comp = torch.logsumexp(lp, -1).sum(-1) + torch.log(self.weights.to(x))
        return torch.logsumexp(per_comp, 1)

    def score(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(xx, sigma).sum(), xx)
        return g


class ZeroCoMGaussian:
    """Point clouds with i.i.d. ``N(0, std^2)`` coordinates projected to zero centre of mass."""

    def __init__(self, std: float = 1.0, dim: int = 3) -> None:
        self.std, self.dim = std, dim

    def sample(self, sizes: list[int], generator: torch.Generator | None = None,
               dtype=torch.float64) -> State:
        batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        pos = torch.randn(int(sum(sizes)), self.dim, generator=generator, dtype=dtype) * self.std
        c = ZeroCoM()
        return State({"pos": c.project(pos, batch, len(sizes))}, batch={"pos": batch},
                     num_systems=len(sizes), constraints={"pos": c})

    def score(self, x: Tensor, alpha, sigma) -> Tensor:
        """Score within the subspace: ``-x / (alpha^2 std^2 + sigma^2)``."""
        return -x / (torch.as_tensor(alpha) ** 2 * self.std**2 + torch.as_tensor(sigma) ** 2)


class ExactDenoiser:
    """A testbed distribution as a network in any parameterization.

    ``dist`` is a ``GaussianMixture`` (dense field ``x [B, d]``), a ``WrappedNormalMixture``
    (torus field, VE processes, predicts via the score) or a ``ZeroCoMGaussian`` (flat field).
    Counts its calls in ``nfe``.
    """

    def __init__(self, dist, process: GaussianProcess, param: str = "eps", field: str = "x") -> None:
        self.dist, self.process, self.param, self.field = dist, process, param, field
        self.nfe = 0

    def __call__(self, x: State, t: Tensor) -> State:
        self.nfe += 1
        p, f = self.process, self.field
        tt = t.to(torch.float64)
        a = p.alpha(tt).to(x.dtype)
        s = p.sigma(tt).to(x.dtype)
        v = x[f]
        ex = x.expand
        if isinstance(self.dist, GaussianMixture):
            x0 = self.dist.denoise(v, a, s)
            eps = (v - ex(a, f) * x0) / ex(s, f)
        elif isinstance(self.dist, WrappedNormalMixture):
            eps = -ex(s, f) * self.dist.score(v, s)
            x0 = torch.remainder(v - ex(s, f) * eps, 1.0)
        else:
            eps = -ex(s, f) * self.dist.score(v, ex(a, f), ex(s, f))
            x0 = (v - ex(s, f) * eps) / ex(a, f)
        da = p.d_alpha(tt).to(x.dtype) if self.param == "velocity" else None
        ds = p.d_sigma(tt).to(x.dtype) if self.param == "velocity" else None
        return from_prediction(x.replace(**{f: x0}), x.replace(**{f: eps}), self.param, a, s, da, ds)


def torus_state(x: Tensor, field: str = "x") -> State:
    """A dense torus field ``x [B, d]``."""
    return State({field: x}, constraints={field: FlatTorus()})
