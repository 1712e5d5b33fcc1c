"""UniPC (Zhao et al. 2023): unified predictor-corrector in log-SNR with data prediction."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from ..core import Model, State
from ._common import Callback, Loop
from ._grid import TimeGrid


def _unipc_system(rks: list[float], h: float, order: int, variant: str) -> tuple[np.ndarray, np.ndarray,
                                                                                  float, float]:
    """``R, b`` of UniPC's order conditions (Zhao et al. 2023, Alg. 2/3), ``h phi_1`` and ``B(h)``.

    In data prediction ``hh = -h``; bh1 takes ``B(h) = hh``, bh2 ``B(h) = e^hh - 1``."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = math.expm1(hh) if variant == "bh2" else hh
    fac = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * fac / b_h)
        fac *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fac
    return np.array(R), np.array(b), h_phi_1, b_h


def _unipc_update(x: State, sig_ratio: float, a_next: float, h: float, m0: State,
                  hist: list[tuple[float, State]], lam0: float, order: int, variant: str,
                  m_new: State | None) -> State:
    """One UniP step (``m_new is None``) or UniC step (``m_new``: the model output at the new point)
    from ``x`` (level with log-SNR ``lam0``, data prediction ``m0``) using ``order - 1`` earlier
    predictions ``hist`` (most recent last)."""
    rks, d1s = [], []
    for lam_k, m_k in reversed(hist[len(hist) - (order - 1):] if order > 1 else []):
        rk = (lam_k - lam0) / h
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    R, b, h_phi_1, b_h = _unipc_system(rks, h, order, variant)
    out = (x * sig_ratio).lincomb(1.0, m0, -a_next * h_phi_1)
    if m_new is None:
        if not d1s:
            return out
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    else:
        rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
        d1s.append(m_new - m0)
    for r, d in zip(rhos, d1s, strict=True):
        out = out.lincomb(1.0, d, -a_next * b_h * r)
    return out


@torch.no_grad()
def unipc(model: Model, x: State, grid: TimeGrid | int, *, order: int = 2,
          variant: Literal["bh1", "bh2"] = "bh2", lower_order_final: bool = True,
          callback: Callback | None = None, progress: bool = False) -> State:
    """UniPC-p with the bh1/bh2 coefficient choice (Zhao et al. 2023): a multistep predictor of
    order ``order`` and the UniC corrector, which re-does each step with the model output at the
    new point (evaluated at the uncorrected iterate), one order higher at no extra NFE.

    Warm-up with lower orders; with ``lower_order_final`` the order also drops over the last steps,
    and the step into the clean point is always first order (the data prediction).
    """
    if order not in (1, 2, 3) or variant not in ("bh1", "bh2"):
        raise ValueError("unipc: order must be 1, 2 or 3 and variant 'bh1' or 'bh2'")
    loop = Loop("unipc", model, x, grid, callback, progress)
    g = loop.grid
    lam, al, sg = g.log_snr.tolist(), g.alpha.tolist(), g.sigma.tolist()
    hist: list[tuple[float, State]] = []  # (lambda, x0) at earlier finite-lambda points
    prev = None  # (iterate before the last predictor step, its index, its order)
    for i in range(loop.steps):
        p = loop.predict(x, i)
        if prev is not None and math.isfinite(lam[prev[1]]):
            xj, j, k = prev
            x = _unipc_update(xj, sg[i] / sg[j], al[i], lam[i] - lam[j], hist[-1][1], hist[:-1],
                              lam[j], k, variant, p.x0)
        if math.isfinite(lam[i]):
            hist.append((lam[i], p.x0))
        k = min(order, len(hist), loop.steps - i if lower_order_final else order)
        h = lam[i + 1] - lam[i]
        if loop.is_clean(i + 1) or not math.isfinite(lam[i]):
            # clean point: the data prediction; from alpha = 0 (lambda = -inf): DDIM's step.
            x_new = p.x0 if loop.is_clean(i + 1) else p.x0.lincomb(al[i + 1], p.eps, sg[i + 1])
        else:
            x_new = _unipc_update(x, sg[i + 1] / sg[i], al[i + 1], h, p.x0, hist[:-1], lam[i], k,
                                  variant, None)
        prev = (x, i, max(k, 1))
        x = loop.finish_step(i, x_new, p.x0)
    return loop.done(x)
