"""Learned time grids: the grid of a multistep solver fitted to a teacher by gradient descent.

LD3 (Tong et al. 2024, "Learning to Discretize Denoising Diffusion ODEs") and Align Your Steps
(Sabour et al. 2024) show that the best few-step grid depends on the model. Here the solver
(``unipc`` or ``dpmpp_pc``) is re-expressed with tensor coefficients, so the distance between its
samples and a teacher's (an accurate solve from the same starting points) is differentiable in the
grid; Adam then moves the grid. The twin solver computes exactly what the plain sampler computes on
the same grid (a test checks it to round-off), so the learned grid is used with the plain, fast
sampler. Cost: ``iters`` forward and backward passes of ``steps`` model calls on the training batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core import Level, Model, State
from ._grid import TimeGrid, _ends_clean, logsnr_uniform
from ._multistep import step_dispatch

Solver = Literal["unipc", "dpmpp_pc"]
_GL_X, _GL_W = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(24))
_MIN_FRACTION = 1e-3   # initial share of the log-SNR range left after the last model point


@dataclass(frozen=True)
class LearnedGrid:
    """Result of ``learn_grid``.

    ``grid``: the best grid found (lowest training loss; a ``TimeGrid`` ending in the clean point),
    for ``solver`` with ``options``; ``losses [iters + 1]``: training loss (mean distance to the
    teacher) per iteration, the initial grid's first; ``nfe``: model calls spent learning
    (backward passes not counted); ``seconds``: wall time.
    """

    grid: TimeGrid
    solver: Solver
    options: dict
    losses: list[float] = field(repr=False)
    nfe: int
    seconds: float

    @property
    def initial_loss(self) -> float:
        return self.losses[0]

    @property
    def best_loss(self) -> float:
        return min(self.losses)

    def sample(self, model: Model, x: State, **kwargs) -> State:
        """Run the plain sampler on the learned grid (``kwargs`` as for that sampler)."""
        from ._multistep import dpmpp_pc, unipc

        fn = unipc if self.solver == "unipc" else dpmpp_pc
        return fn(model, x, self.grid, **{**self.options, **kwargs})


# ------------------------------------------------------------------------------------------------
# The multistep solvers of ``_multistep`` with tensor coefficients (differentiable in the grid)
# ------------------------------------------------------------------------------------------------
def _lagrange_weights(nodes: list[Tensor], a: Tensor, b: Tensor, lam_next: Tensor | None) -> list[Tensor]:
    """``int_a^b w(u) L_j(u) du`` with ``w = e^(u - lam_next)`` (or 1 when ``lam_next`` is None)."""
    x, w = _GL_X.to(a), _GL_W.to(a)
    u = 0.5 * (b - a) * x + 0.5 * (b + a)
    wq = 0.5 * (b - a) * w * (torch.exp(u - lam_next) if lam_next is not None else 1.0)
    out = []
    for j, nj in enumerate(nodes):
        basis = torch.ones_like(u)
        for m, nm in enumerate(nodes):
            if m != j:
                basis = basis * (u - nm) / (nj - nm)
        out.append((wq * basis).sum())
    return out


def _exact_step(x: State, sig_ratio: Tensor, a_next: Tensor, lam: Tensor, lam_next: Tensor,
                nodes: list[Tensor], x0s: list[State]) -> State:
    c = [-torch.expm1(lam - lam_next)] if len(nodes) == 1 else _lagrange_weights(nodes, lam, lam_next,
                                                                                   lam_next)
    out = x * sig_ratio
    for cj, x0 in zip(c, x0s, strict=True):
        out = out.lincomb(1.0, x0, a_next * cj)
    return out


def _bh_step(x: State, sig_ratio: Tensor, a_next: Tensor, h: Tensor, lam0: Tensor, m0: State,
             earlier: list[tuple[Tensor, State]], order: int, variant: str, m_new: State | None) -> State:
    """UniPC's B(h) step (Zhao et al. 2023, Alg. 2/3), as ``_multistep._bh_step``."""
    rks, d1s = [], []
    for lam_k, m_k in reversed(earlier[len(earlier) - (order - 1):] if order > 1 else []):
        rk = (lam_k - lam0) / h
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(torch.ones_like(h))
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh) if variant == "bh2" else hh
    fac, rows, b = 1, [], []
    for i in range(1, order + 1):
        rows.append(torch.stack([r ** (i - 1) for r in rks]))
        b.append(h_phi_k * fac / b_h)
        fac *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fac
    R, bv = torch.stack(rows), torch.stack(b)
    out = (x * sig_ratio).lincomb(1.0, m0, -a_next * h_phi_1)
    if m_new is None:
        if not d1s:
            return out
        rhos = [h.new_tensor(0.5)] if order == 2 else list(torch.linalg.solve(R[:-1, :-1], bv[:-1]))
    else:
        rhos = [h.new_tensor(0.5)] if order == 1 else list(torch.linalg.solve(R, bv))
        d1s.append(m_new - m0)
    for r, d in zip(rhos, d1s, strict=True):
        out = out.lincomb(1.0, d, -a_next * b_h * r)
    return out


_step = step_dispatch(_exact_step, _bh_step)


def solve_on_grid(model: Model, x: State, t: Tensor, *, solver: Solver = "unipc", order: int = 2,
                  variant: Literal["bh1", "bh2"] = "bh2", lower_order_final: bool = True,
                  final_step: Literal["adams", "denoise"] = "denoise") -> State:
    """``unipc`` / ``dpmpp_pc`` on the model times ``t [steps]`` (decreasing, alpha > 0) followed by
    the clean point, differentiable in ``t`` (and in the model's parameters).

    Same arithmetic as the plain samplers on ``TimeGrid.from_times(process, t)``; used by
    ``learn_grid``. ``dpmpp_pc`` here always has its corrector.
    """
    proc = model.process
    dt = x.dtype
    tt = t.to(dt)
    al, sg = proc.alpha(tt), proc.sigma(tt)
    if bool((al <= 0).any()) or bool((sg <= 0).any()):
        raise ValueError("solve_on_grid: every model time needs alpha > 0 and sigma > 0")
    lam = torch.log(al) - torch.log(sg)
    coef = variant if solver == "unipc" else "exact"
    lof = lower_order_final if solver == "unipc" else False
    steps = tt.shape[0]
    hist: list[tuple[Tensor, State]] = []
    seen: list[tuple[Tensor, State, State, Tensor]] = []
    prev = None
    for i in range(steps):
        p = model.predict(x, tt[i], al[i], sg[i])
        x_eval = x
        if prev is not None:
            xj, j, k = prev
            x = _step(coef, xj, sg[i] / sg[j], al[i], lam[j], lam[i], hist[-1][1], hist[:-1], k, p.x0)
        hist.append((lam[i], p.x0))
        if final_step == "adams":
            seen = [*seen, (sg[i] / al[i], x_eval, p.x0, al[i])][-order:]
        k = max(1, min(order, len(hist), steps - i if lof else order))
        if i + 1 < steps:
            x_new = _step(coef, x, sg[i + 1] / sg[i], al[i + 1], lam[i], lam[i + 1], p.x0, hist[:-1], k, None)
            level = Level(al[i + 1], sg[i + 1])
        elif final_step == "adams":
            nodes = [e[0] for e in seen]
            w = [-nodes[0]] if len(nodes) == 1 else _lagrange_weights(nodes, nodes[-1], torch.zeros_like(
                nodes[-1]), None)
            x_new = x / al[i]
            for wj, (s_j, x_j, x0_j, a_j) in zip(w, seen, strict=True):
                x_new = x_new.lincomb(1.0, x_j, wj / (s_j * a_j)).lincomb(1.0, x0_j, -wj / s_j)
            level = Level(1.0, 0.0)
        else:
            x_new, level = p.x0, Level(1.0, 0.0)
        prev = (x, i, k)
        x = x_new.project(level)
    return x.canonical()


# ------------------------------------------------------------------------------------------------
# Learning
# ------------------------------------------------------------------------------------------------
def learn_grid(model: Model, x: State, target: State | None = None, *, steps: int,
               solver: Solver = "unipc", order: int = 2, final_step: Literal["adams", "denoise"] = "denoise",
               init: TimeGrid | None = None, iters: int = 150, lr: float = 0.05,
               t_start: float | None = None, progress: bool = False) -> LearnedGrid:
    """Fit the grid of ``solver`` with ``steps`` model calls to a teacher (LD3-style).

    Args:
        model: the model to sample (its process fixes the time range).
        x: training starting points at ``t_start`` (B systems, e.g. ``process.prior(template)`` with
            a generator of their own; a few hundred suffice: the grid has ``steps`` parameters).
            Keep them apart from any points the grid is evaluated on.
        target: the teacher's samples from ``x`` (same layout); default: ``adaptive`` with
            ``rtol = atol = 1e-7``, ending in the data prediction at ``t_min`` like the grids.
        steps: model calls of the learned sampler (the last step goes to the clean point).
        solver, order, final_step: the sampler the grid is for (``unipc`` with bh2 and
            lower-order final steps, or ``dpmpp_pc`` with its corrector).
        init: starting grid (default ``logsnr_uniform(process, steps)``); its first time is ``t_start``.
        iters, lr: Adam iterations and learning rate on the grid's parameters.
        t_start: the time of ``x`` (default ``t_max``); needs ``alpha > 0`` there.
        progress: a tqdm bar with the loss.

    The parameters are the shares of the log-SNR range between ``t_start`` and ``t_min`` taken by
    each step (a softmax, so the grid stays ordered); a last share, left unused, lets the last model
    point move above ``t_min``. The loss is the mean Euclidean distance to the teacher per system
    (``State.difference``, so torus fields use the shortest image).

    Returns:
        ``LearnedGrid``; use ``.grid`` with the plain sampler (or ``.sample``).
    """
    if solver not in ("unipc", "dpmpp_pc"):
        raise ValueError(f"learn_grid: solver must be 'unipc' or 'dpmpp_pc', got {solver!r}")
    if final_step not in ("adams", "denoise"):
        raise ValueError("learn_grid: final_step must be 'adams' or 'denoise'")
    if order not in (1, 2, 3):
        raise ValueError("learn_grid: order must be 1, 2 or 3")
    if steps < 2:
        raise ValueError(f"learn_grid: needs at least 2 steps, got {steps}")
    if iters < 0 or lr <= 0:
        raise ValueError("learn_grid: iters must be >= 0 and lr > 0")
    proc = model.process
    f64 = torch.float64
    t0 = torch.tensor(proc.t_max if t_start is None else t_start, dtype=f64)
    if float(proc.alpha(t0)) <= 0:
        raise ValueError(f"learn_grid: alpha = 0 at t_start = {float(t0)} (flow path); pass a t_start "
                         "below t_max and starting points drawn there")
    t_end = torch.tensor(proc.t_min, dtype=f64)
    if _ends_clean(proc):
        t_end = proc.t_of_sigma_ratio(torch.tensor(1e-3, dtype=f64))
    lam0, lam_end = proc.log_snr(t0), proc.log_snr(t_end)
    init = logsnr_uniform(proc, steps, t_start=float(t0)) if init is None else init
    if not init.clean_last or init.steps != steps:
        raise ValueError(f"learn_grid: init must end in the clean point and have {steps} steps")
    if abs(float(init.t[0]) - float(t0)) > 1e-9 * max(1.0, abs(float(t0))):
        raise ValueError(f"learn_grid: init starts at t = {float(init.t[0])}, not t_start = {float(t0)}")
    opts = {"order": order, "final_step": final_step}
    started = time.perf_counter()
    nfe0 = model.nfe
    if target is None:
        from ._adaptive import adaptive
        with torch.no_grad():
            target = adaptive(model, x, t_start=float(t0), rtol=1e-7, atol=1e-7).x
    target = target.detach()

    # shares of [lam0, lam_end]: steps - 1 steps between model points, then the unused rest
    lam_init = proc.log_snr(init.t[:-1].to(f64))
    span = lam_end - lam0
    shares = torch.cat([torch.diff(lam_init) / span, (lam_end - lam_init[-1:]) / span]).clamp(min=0)
    shares = (shares + _MIN_FRACTION) / (shares + _MIN_FRACTION).sum()
    z = torch.log(shares).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)

    def times(z: Tensor) -> Tensor:
        cum = torch.cumsum(torch.softmax(z, 0), 0)[:-1]
        lam = torch.cat([lam0.reshape(1), lam0 + span * cum])
        return torch.cat([t0.reshape(1), proc.t_of_log_snr(lam[1:])])

    def loss_of(t: Tensor) -> Tensor:
        out = solve_on_grid(model, x, t, solver=solver, **opts)
        d2 = out.difference(target).sqnorm()
        return torch.sqrt(d2 + 1e-30).mean()

    losses: list[float] = []
    best = (float("inf"), None)
    bar = tqdm(total=iters + 1, desc="learn_grid", disable=not progress, leave=False)
    for it in range(iters + 1):
        t = times(z)
        loss = loss_of(t)
        val = float(loss.detach())
        if not np.isfinite(val):
            raise FloatingPointError(f"learn_grid: the loss became {val} at iteration {it}")
        losses.append(val)
        if val < best[0]:
            best = (val, t.detach().clone())
        bar.update(1)
        bar.set_postfix(loss=f"{val:.3g}")
        if it == iters:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    bar.close()
    t_best = best[1]
    if not bool((torch.diff(t_best) < 0).all()):  # equal times after t_of_log_snr's clamping
        raise RuntimeError("learn_grid: two grid points merged; lower lr or use fewer steps")
    grid = TimeGrid.from_times(proc, t_best, final="zero")
    return LearnedGrid(grid, solver, opts, losses, model.nfe - nfe0, time.perf_counter() - started)
