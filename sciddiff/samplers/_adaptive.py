"""Adaptive-step probability-flow ODE sampler (torchdiffeq's embedded Runge-Kutta solvers).

The probability-flow ODE (Song et al. 2021, Eq. 13) of every process ``x_t = alpha x_0 + sigma eps``
reads, in the scaled variables ``y = x / alpha`` and ``s = sigma / alpha`` (Karras et al. 2022,
Eq. 4), ``dy/ds = eps(alpha(t) y, t)`` with ``t = t(s)``. We integrate it in ``u = log s``:

    dy/du = s * eps(alpha(t(s)) y, t(s)),    s = exp(u),

which is far better conditioned than ``t`` or ``s``: the right-hand side stays O(|y|) over the
whole range (``s`` spans 1e-3 .. 1e2), so an error-controlled solver (Dormand-Prince 5(4),
Dormand & Prince 1980; as in Song et al. 2021, Sec. 4.3, who use RK45) takes steps of similar
size in ``u`` at every noise level. The private helpers here (``_Layout``, ``_time_range``,
``_level``) are shared with ``sciddiff.likelihood``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint
from tqdm.auto import tqdm

from ..core import GaussianProcess, Level, Model, State, check_compatible
from ._common import Callback, StepInfo
from ._grid import FLOW_S_END, _finite_start

#: Embedded-error (adaptive) Runge-Kutta methods of torchdiffeq that ``adaptive`` accepts.
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")



@dataclass(frozen=True)
class AdaptiveResult:
    """Output of ``adaptive``.

    Attributes:
        x: the sample, canonical (torus fields wrapped); same layout as the input State.
        nfe: model evaluations, including the final denoising call and any made for ``callback``.
        steps: accepted solver steps.
        rejected: rejected solver steps (each wasted the step's evaluations).
        t_start, t_end: the integration range actually used (after defaults).
    """

    x: State
    nfe: int
    steps: int
    rejected: int
    t_start: float
    t_end: float


# ------------------------------------------------------------------------------------------------
# helpers shared with sciddiff.likelihood
class _Layout:
    """Packs the fields of a State into one flat tensor ``[total]`` and back (same layout)."""

    def __init__(self, template: State) -> None:
        self.template = template
        self.names = list(template.keys())
        self.shapes = [template[k].shape for k in self.names]
        self.numels = [template[k].numel() for k in self.names]
        self.total = sum(self.numels)

    def pack(self, state: State) -> Tensor:
        return torch.cat([state[k].reshape(-1) for k in self.names])

    def unpack(self, flat: Tensor) -> State:
        parts = torch.split(flat, self.numels)
        views = zip(self.names, parts, self.shapes, strict=True)
        return self.template.replace(**{k: p.view(sh) for k, p, sh in views})

    def system_index(self) -> Tensor:
        """System of each packed coordinate ``[total]`` (long)."""
        st = self.template
        out = []
        for k, sh in zip(self.names, self.shapes, strict=True):
            rows = st.batch[k] if k in st.batch else torch.arange(sh[0], device=st.device)
            per_row = math.prod(sh[1:])
            out.append(rows.repeat_interleave(per_row))
        return torch.cat(out)

    def coordinate_index(self) -> tuple[Tensor, int]:
        """Index of each packed coordinate within its own system's vector ``[total]`` (long), and
        the largest number of coordinates of any system."""
        st = self.template
        dev = st.device
        offset = torch.zeros(st.num_systems, dtype=torch.long, device=dev)
        out = []
        for k, sh in zip(self.names, self.shapes, strict=True):
            per_row = math.prod(sh[1:])
            if k in st.batch:
                b = st.batch[k]
                sorted_b, order = torch.sort(b, stable=True)
                counts = torch.bincount(b, minlength=st.num_systems)
                starts = torch.cumsum(counts, 0) - counts
                local = torch.empty_like(b)
                local[order] = torch.arange(b.shape[0], device=dev) - starts[sorted_b]
                rows_per_sys = counts
            else:
                b = torch.arange(sh[0], device=dev)
                local = torch.zeros_like(b)
                rows_per_sys = torch.ones(st.num_systems, dtype=torch.long, device=dev)
            idx = (offset[b] + local * per_row)[:, None] + torch.arange(per_row, device=dev)[None]
            out.append(idx.reshape(-1))
            offset = offset + rows_per_sys * per_row
        return torch.cat(out), int(offset.max()) if offset.numel() else 0


def _tangent(state: State) -> State:
    """Project a vector field into each field's tangent space (zero-CoM: remove the mean)."""
    return state._with({
        k: state.constraint(k).project_noise(v, state.batch.get(k), state.num_systems)
        for k, v in state.items()
    })


def _scalar(fn, t: float) -> float:
    return float(fn(torch.tensor(t, dtype=torch.float64)))


def _time_range(process: GaussianProcess, t_start: float | None, t_end: float | None,
                name: str) -> tuple[float, float]:
    """Resolve the integration range ``t_start`` (noisy end) .. ``t_end`` (data end).

    Defaults: ``t_start = t_max``, moved to ``t_max - 1e-4 (t_max - t_min)`` where
    ``alpha(t_max) = 0`` (flow paths: ``y = x / alpha`` is undefined there; the grids do the same);
    ``t_end = t_min``, or the time of ``s = FLOW_S_END`` where ``sigma(t_min) = 0``.
    Explicit values must lie in ``[t_min, t_max]`` (the processes clamp ``t(s)`` to this range) and
    have ``alpha(t_start) > 0`` and ``sigma(t_end) > 0``.
    """
    lo, hi = process.t_min, process.t_max
    tol = 1e-9 * max(1.0, abs(hi - lo))
    for what, v in (("t_start", t_start), ("t_end", t_end)):
        if v is not None and not (lo - tol <= v <= hi + tol):
            raise ValueError(f"{name}: {what}={v} lies outside the process's time range [{lo}, {hi}]")
    default_start = float(_finite_start(process, torch.tensor(hi, dtype=torch.float64)))
    if t_start is None:
        t_start = default_start
    elif _scalar(process.alpha, t_start) <= 0:
        raise ValueError(
            f"{name}: alpha(t_start={t_start}) = 0 (pure noise), where the scaled variable x / alpha "
            f"is undefined; start slightly below, e.g. t_start={default_start:.6g}, or leave "
            "t_start=None for that default"
        )
    if t_end is None:
        t_end = lo
        if _scalar(process.sigma, t_end) <= 0:
            t_end = float(process.t_of_sigma_ratio(torch.tensor(FLOW_S_END, dtype=torch.float64)))
    elif _scalar(process.sigma, t_end) <= 0:
        raise ValueError(
            f"{name}: sigma(t_end={t_end}) = 0, where log(sigma / alpha) = -inf; end at a small "
            f"positive noise level (leave t_end=None for the time of sigma/alpha = {FLOW_S_END:.3g})"
        )
    s_start = _scalar(process.sigma, t_start) / _scalar(process.alpha, t_start)
    s_end = _scalar(process.sigma, t_end) / _scalar(process.alpha, t_end)
    if not s_start > s_end:
        raise ValueError(
            f"{name}: need a noisier start than end; got sigma/alpha = {s_start:.4g} at t_start="
            f"{t_start} and {s_end:.4g} at t_end={t_end}"
        )
    return float(t_start), float(t_end)


def _level(process: GaussianProcess, u: Tensor, u_range: tuple[float, float] | None = None
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(s, t, alpha, sigma)`` as float64 0-d CPU tensors at ``u = log(sigma / alpha)``.

    ``u`` is first clamped to ``u_range`` (the integration interval): torchdiffeq's initial step
    selection probes ``u0 + h0`` with an unchecked ``h0``, which may leave the interval (and the
    process's time range, where ``t(s)`` is clamped and ``alpha`` may vanish).
    """
    u = u.detach().to(device="cpu", dtype=torch.float64)
    if u_range is not None:
        u = u.clamp(min(u_range), max(u_range))
    s = torch.exp(u)
    t = process.t_of_sigma_ratio(s)
    return s, t, process.alpha(t), process.sigma(t)


def _log_s(process: GaussianProcess, t: float) -> float:
    return math.log(_scalar(process.sigma, t) / _scalar(process.alpha, t))


def _check_method(method: str, name: str) -> None:
    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"{name}: method must be an adaptive solver, one of {ADAPTIVE_METHODS}; got "
                         f"{method!r}")


# ------------------------------------------------------------------------------------------------
class _PFODE:
    """``dy/du = s * eps`` on the packed state; counts evaluations, checks finiteness, reports."""

    def __init__(self, model: Model, layout: _Layout, u_range: tuple[float, float],
                 callback: Callback | None, bar) -> None:
        self.model, self.layout, self.callback, self.bar = model, layout, callback, bar
        self.u_range = u_range
        self.process = model.process
        self.dtype, self.device = layout.template.dtype, layout.template.device
        self.nfe = 0
        self.accepted = 0
        self.rejected = 0
        self._cache: deque = deque(maxlen=16)  # (y_flat, x0) of recent evaluations, for callbacks
        self._pending: tuple[int, float] | None = None

    def state_at(self, y: Tensor, u: float) -> tuple[State, Tensor, Tensor, Tensor]:
        _, t, a, sg = _level(self.process, torch.tensor(u, dtype=torch.float64), self.u_range)
        t, a, sg = (v.to(device=self.device, dtype=self.dtype) for v in (t, a, sg))
        x = (self.layout.unpack(y) * a).project(Level(a, sg))
        return x, t, a, sg

    def predict(self, x: State, t: Tensor, a: Tensor, sg: Tensor, u: float):
        pred = self.model.predict(x, t, a, sg)
        self.nfe += 1
        pred.eps.check_finite(
            f"adaptive: model output at t={float(t):.6g} (sigma/alpha={math.exp(u):.4g}, evaluation "
            f"{self.nfe})"
        )
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"sigma/alpha={math.exp(u):.3g}", refresh=False)
        return pred

    def __call__(self, u: Tensor, y: Tensor) -> Tensor:
        uf = float(u)
        x, t, a, sg = self.state_at(y, uf)
        pred = self.predict(x, t, a, sg, uf)
        if self.callback is not None:
            self._cache.append((y, pred.x0))
        # eps in the tangent space (zero CoM) keeps y on the subspace even for a non-equivariant net.
        return self.layout.pack(_tangent(pred.eps)) * math.exp(uf)

    # torchdiffeq step callbacks (time un-negated by torchdiffeq; dt > 0 in the flipped time).
    def callback_accept_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.accepted += 1
        if self.callback is not None:
            if self._pending is not None:  # the previous step ended where this one starts
                self.report(y0)
            self._pending = (self.accepted - 1, float(t0) - float(dt))

    def callback_reject_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.rejected += 1

    def report(self, y: Tensor) -> None:
        assert self._pending is not None and self.callback is not None
        i, u = self._pending
        self._pending = None
        x, t, a, sg = self.state_at(y, u)
        x0 = None
        tol = 64 * torch.finfo(y.dtype).eps * (1 + float(y.abs().max()))
        for yc, x0c in reversed(self._cache):  # FSAL: the step's last stage is at its end point
            if float((yc - y).abs().max()) <= tol:
                x0 = x0c
                break
        if x0 is None:
            x0 = self.predict(x, t, a, sg, u).x0
        self.callback(StepInfo(i, float(t), float(sg), x.canonical(), x0.canonical()))

    def finish(self, y_end: Tensor) -> None:
        if self.callback is not None and self._pending is not None:
            self.report(y_end)


@torch.no_grad()
def adaptive(model: Model, x: State, *, t_start: float | None = None, t_end: float | None = None,
             rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5", denoise_final: bool = True,
             callback: Callback | None = None, progress: bool = False,
             options: dict | None = None) -> AdaptiveResult:
    """Solve the probability-flow ODE from ``t_start`` to ``t_end`` with an adaptive solver.

    Integrates ``dy/du = s * eps(alpha y, t(s))`` in ``u = log(sigma / alpha)`` (see the module
    docstring; Song et al. 2021, Sec. 4.3; Karras et al. 2022, Eq. 4) with ``torchdiffeq.odeint``
    (Chen et al. 2018), all fields packed into one vector; the error norm is torchdiffeq's RMS over
    every coordinate of every system, so the systems of a batch share one step size. The last step
    lands exactly on ``t_end`` (no overshoot to noise levels outside the process's range).

    Args:
        model: network + process + parameterization; called as ``model.predict`` (canonical input).
        x: the starting State at ``t_start`` (e.g. ``process.prior(template)``), B systems.
        t_start: noisy end (default ``t_max``; for flow paths, where ``alpha(t_max) = 0``, the
            default is ``t_max - 1e-4 (t_max - t_min)`` and an explicit ``t_start`` with
            ``alpha = 0`` raises ``ValueError``).
        t_end: data end (default ``t_min``; for flow paths, where ``sigma(t_min) = 0`` and
            ``log s = -inf``, the time of ``sigma / alpha = exp(-10)``). Must have ``sigma > 0``.
        rtol, atol: solver tolerances on ``y = x / alpha``.
        method: an adaptive torchdiffeq method (``ADAPTIVE_METHODS``).
        denoise_final: return the model's data prediction ``x0`` at ``t_end`` (one extra
            evaluation: the jump from ``sigma(t_end)`` to 0, as the clean point of the grids);
            otherwise ``x`` at ``t_end``.
        callback: called once per accepted step, after it, with ``StepInfo(i, t, sigma, x, x0)``:
            ``x`` the state at the step's end (canonical), ``x0`` the model's data prediction
            there (from the solver's last stage, which dopri5/bosh3 evaluate at the step's end;
            otherwise one extra, counted, evaluation). Calls are made as the solve proceeds.
        progress: show a tqdm bar counting model evaluations, with the current ``sigma/alpha``.
        options: extra torchdiffeq solver options (``max_num_steps``, ``first_step``, ...).

    Returns:
        ``AdaptiveResult`` with the canonical sample ``x`` (projected onto each field's
        constraint: zero CoM, known entries at the final level) and the evaluation/step counts.

    Raises:
        FloatingPointError: the model returned NaN/Inf (message names the field, t and evaluation).
        ValueError: a bad time range or method.

    Deterministic: no randomness beyond ``x``.
    """
    if not isinstance(model, Model):
        raise TypeError("adaptive: model must be a sciddiff Model (network + process + param)")
    _check_method(method, "adaptive")
    process = model.process
    check_compatible(process, x)
    t_start, t_end = _time_range(process, t_start, t_end, "adaptive")
    x.check_finite("adaptive: initial state")

    layout = _Layout(x)
    a0 = _scalar(process.alpha, t_start)
    y0 = layout.pack(x) / a0
    u0, u1 = _log_s(process, t_start), _log_s(process, t_end)
    u_span = torch.tensor([u0, u1], dtype=torch.float64, device=x.device)

    bar = tqdm(desc="adaptive", unit="nfe", leave=False) if progress else None
    func = _PFODE(model, layout, (u0, u1), callback, bar)
    opts = dict(options or {})
    opts.setdefault("step_t", torch.tensor([u1], dtype=torch.float64))
    try:
        sol = odeint(func, y0, u_span, rtol=rtol, atol=atol, method=method, options=opts)
        y1 = sol[-1]
        func.finish(y1)
        # The exact level of t_end (not t(s) re-derived from u1) for the final scaling.
        a1 = torch.tensor(_scalar(process.alpha, t_end), dtype=x.dtype, device=x.device)
        s1 = torch.tensor(_scalar(process.sigma, t_end), dtype=x.dtype, device=x.device)
        x_end = (layout.unpack(y1) * a1).project(Level(a1, s1))
        x_end.check_finite(f"adaptive: state at t_end={t_end:.6g}")
        if denoise_final:
            tt = torch.tensor(t_end, dtype=x.dtype, device=x.device)
            pred = func.predict(x_end, tt, a1, s1, u1)
            x_end = pred.x0.project(Level(1.0, 0.0))
            x_end.check_finite("adaptive: final data prediction")
    finally:
        if bar is not None:
            bar.close()
    return AdaptiveResult(x=x_end.canonical(), nfe=func.nfe, steps=func.accepted, rejected=func.rejected,
                          t_start=t_start, t_end=t_end)
