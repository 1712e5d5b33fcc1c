"""Patch-wise downscaling of large grids: overlapping tiles blended with a smooth partition of unity.

A network trained on small crops is applied to a large grid tile by tile (CorrDiff, Mardani et al.
2023, Sec. 3 "patch-based" generation; overlap-tile strategy of Ronneberger et al. 2015, U-Net).
The coarse field is cut into overlapping windows of ``patch`` coarse cells; each window is
downscaled by ``fn`` and the fine outputs are blended with separable weights. Along one axis a
window's weight is

- ``0`` within ``trim`` coarse cells of an edge shared with a neighbour (where the network's
  receptive field runs off the window: those cells are discarded),
- a raised-cosine (Hann) ramp ``sin^2(pi/2 * u)`` over the rest of the overlap,
- ``1`` elsewhere, and on the outer edges of the grid.

For a regular tiling, the ramps of two neighbours are ``sin^2`` and ``cos^2`` of the same angle, so
the raw weights sum to one exactly (a partition of unity; `axis_weights` returns them); where the
last window is shifted to fit the grid, the blend divides by the summed weight. A function whose
receptive field (in fine cells) is at most ``trim * factor`` cells is therefore reproduced exactly
by its patch-wise application. For stochastic ``fn`` (diffusion), the windows' independent samples
are cross-faded over the ramp, which hides seams but reduces the ensemble spread there slightly
(blending two independent samples with weights ``w, 1 - w`` scales the variance by
``w^2 + (1 - w)^2 >= 1/2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PatchWindow:
    """One window of the tiling, as coarse-cell indices into the full grid.

    ``rows [ph]`` and ``cols [pw]`` (long) index the coarse grid; ``cols`` wraps around for a
    periodic longitude. `fine_rows` / `fine_cols` give the matching fine-grid indices
    ``[ph * factor]`` / ``[pw * factor]`` (e.g. to slice static fields for the window).
    """

    rows: Tensor
    cols: Tensor
    factor: int

    def fine_rows(self) -> Tensor:
        """Fine-grid row indices ``[ph * factor]`` covered by the window."""
        return _refine_index(self.rows, self.factor)

    def fine_cols(self) -> Tensor:
        """Fine-grid column indices ``[pw * factor]`` covered by the window."""
        return _refine_index(self.cols, self.factor)


def _refine_index(idx: Tensor, factor: int) -> Tensor:
    """Coarse indices ``[n]`` -> the fine indices of their cells ``[n * factor]``, in order."""
    return (idx[:, None] * factor + torch.arange(factor)).reshape(-1)


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """An int or a pair of ints -> a pair, validated as non-negative integers."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def tile_starts(size: int, patch: int, overlap: int, *, periodic: bool = False) -> list[int]:
    """Start indices of windows of ``patch`` cells covering ``size`` cells, neighbours overlapping
    by at least ``overlap`` cells.

    Non-periodic: the fewest windows whose stride ``patch - overlap`` covers the axis, spread
    evenly from ``0`` to ``size - patch`` (so every overlap is >= ``overlap``). Periodic: the fewest
    windows starting at evenly spaced points of the circle, the last wrapping around. A single window
    ``[0]`` when ``size <= patch``.
    """
    if size <= patch:
        return [0]
    stride = patch - overlap
    if periodic:
        n = math.ceil(size / stride)
        return [round(k * size / n) for k in range(n)]
    n = math.ceil((size - overlap) / stride)
    return [round(k * (size - patch) / (n - 1)) for k in range(n)]


def _ramp(n: int, width: int, trim: int, dtype: torch.dtype) -> Tensor:
    """Rising edge profile ``[n]``: 0 on ``trim`` cells, ``sin^2`` over ``width - 2 trim``, then 1."""
    i = torch.arange(n, dtype=dtype)
    u = ((i - trim + 0.5) / max(width - 2 * trim, 1)).clamp(0.0, 1.0)
    ramp = torch.sin(0.5 * math.pi * u) ** 2
    return torch.where(i < trim, torch.zeros_like(ramp), torch.where(i >= width - trim, 1.0, ramp))


def window_profile(
    n: int, width: int, trim: int, *, left: bool, right: bool, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Blend weights ``[n]`` of one window along one axis, with ramps of ``width`` cells (``trim``
    of them zero) on the sides that have a neighbour (``left`` / ``right``)."""
    w = torch.ones(n, dtype=dtype)
    if width == 0:
        return w
    if left:
        w = w * _ramp(n, width, trim, dtype)
    if right:
        w = w * _ramp(n, width, trim, dtype).flip(0)
    return w


def axis_weights(
    size: int, patch: int, overlap: int, factor: int, *, periodic: bool = False, trim: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Raw (unnormalised) blend weights of every window along one axis, on the fine grid.

    Returns ``[n_windows, size * factor]``: row ``k`` is window ``k``'s profile placed at its fine
    cells (zero elsewhere). For a regular tiling (``size = n * (patch - overlap) + overlap``, or
    ``size = n * (patch - overlap)`` when periodic) the rows sum to one exactly.
    """
    trim = _check_tiling(patch, overlap, trim)
    starts = tile_starts(size, patch, overlap, periodic=periodic)
    n = len(starts)
    length = min(patch, size)
    out = torch.zeros(n, size * factor, dtype=dtype)
    for k, s in enumerate(starts):
        left = n > 1 and (periodic or k > 0)
        right = n > 1 and (periodic or k < n - 1)
        prof = window_profile(length * factor, overlap * factor, trim * factor, left=left, right=right,
                              dtype=dtype)
        idx = _refine_index(torch.arange(s, s + length) % size, factor)
        out[k].index_add_(0, idx, prof)
    return out


def _check_tiling(patch: int, overlap: int, trim: int | None) -> int:
    """Validate one axis's ``patch``, ``overlap``, ``trim`` (coarse cells); return ``trim``."""
    if patch < 1:
        raise ValueError(f"patch must be >= 1 coarse cell, got {patch}")
    if 2 * overlap > patch:
        raise ValueError(f"overlap ({overlap}) must be at most half the patch ({patch}), so that a "
                         "window's two overlaps do not meet")
    trim = overlap // 4 if trim is None else trim
    if trim < 0 or (overlap > 0 and 2 * trim >= overlap) or (overlap == 0 and trim != 0):
        raise ValueError(f"trim ({trim}) must be >= 0 and less than half the overlap ({overlap})")
    return trim


def check_tiling(
    patch: int | tuple[int, int], overlap: int | tuple[int, int], trim: int | tuple[int, int] | None = None
) -> None:
    """Validate `patchwise`'s ``patch``, ``overlap`` and ``trim`` (ints or ``(rows, cols)`` pairs)
    up front, with the errors `patchwise` would raise."""
    (ph, pw), (oh, ow) = _pair(patch, "patch"), _pair(overlap, "overlap")
    th, tw = (None, None) if trim is None else _pair(trim, "trim")
    _check_tiling(ph, oh, th)
    _check_tiling(pw, ow, tw)


def patchwise(
    fn: Callable[[Tensor, PatchWindow], Tensor],
    x: Tensor,
    factor: int,
    patch: int | tuple[int, int],
    overlap: int | tuple[int, int] = 4,
    *,
    periodic: bool = False,
    trim: int | tuple[int, int] | None = None,
) -> Tensor:
    """Downscale ``x [B, C, H, W]`` (coarse) window by window and blend: ``[B, M, C, H f, W f]``.

    ``fn(x_patch [B, C, ph, pw], window) -> [B, M, C, ph f, pw f]`` is called once per window, in
    row-major order (so a stateful random generator inside ``fn`` gives reproducible results).
    ``patch`` and ``overlap`` are in coarse cells (an int or a ``(rows, cols)`` pair); ``trim``
    coarse cells at each shared window edge are discarded (default ``overlap // 4``); ``periodic``
    wraps the last (longitude) axis. The blend is described in the module docstring.
    """
    if x.dim() != 4:
        raise ValueError(f"patchwise expects a coarse field [B, C, H, W], got shape {tuple(x.shape)}")
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    (ph, pw), (oh, ow) = _pair(patch, "patch"), _pair(overlap, "overlap")
    th, tw = (None, None) if trim is None else _pair(trim, "trim")
    H, W = x.shape[-2:]
    wdtype = x.dtype if x.is_floating_point() else torch.float64
    row_w = axis_weights(H, ph, oh, factor, trim=th, dtype=wdtype)
    col_w = axis_weights(W, pw, ow, factor, periodic=periodic, trim=tw, dtype=wdtype)
    rows = tile_starts(H, ph, oh)
    cols = tile_starts(W, pw, ow, periodic=periodic)
    acc: Tensor | None = None
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            win = PatchWindow(torch.arange(r, r + min(ph, H)), torch.arange(c, c + min(pw, W)) % W, factor)
            y = fn(x[:, :, win.rows][:, :, :, win.cols], win)
            fr, fc = win.fine_rows(), win.fine_cols()
            expected = (x.shape[0], x.shape[1], len(fr), len(fc))
            if y.dim() != 5 or (y.shape[0], *y.shape[2:]) != expected:
                raise ValueError(f"fn returned shape {tuple(y.shape)} for a window of shape "
                                 f"{tuple(x.shape[:2]) + (len(win.rows), len(win.cols))}; expected "
                                 f"[{expected[0]}, M, {expected[1]}, {expected[2]}, {expected[3]}]")
            if acc is None:
                acc = y.new_zeros(*y.shape[:3], H * factor, W * factor)
            w = (row_w[i, fr][:, None] * col_w[j, fc][None, :]).to(y.dtype)
            acc[..., fr[0]: fr[-1] + 1, :].index_add_(-1, fc, y * w)
    total = (row_w.sum(0)[:, None] * col_w.sum(0)[None, :]).to(acc.dtype)
    return acc / total
