"""Symmetry checks for functions of point systems: ``fn(g . x) == g . fn(x)``.

``g`` combines a random rotation (optionally times a reflection) of the vector fields, a random
translation of the positions, and a random permutation of the elements within each system, as
e3nn's ``assert_equivariant`` does for irreps (Geiger & Smidt 2022). Vector outputs are expected
to be *translation-invariant*: noise predictions (eps), scores, velocities and forces are
differences of positions, so translating the input leaves them unchanged. A function whose output
moves with its input (an ``x0`` prediction, a sampler's result) is checked with
``translate=False``.

Engine code: imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import State

#: Default ``(atol, rtol)`` per dtype; an error passes when ``err <= atol + rtol * scale`` with
#: ``scale`` the largest magnitude of the expected field.
DEFAULT_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 2e-2),
}


def random_rotation(generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> Tensor:
    """A Haar-random rotation ``[3, 3]`` (orthogonal, det +1).

    A normalised 4-D Gaussian is a uniform unit quaternion, whose rotation matrix is Haar-
    distributed on SO(3) (Shoemake 1992, "Uniform random rotations", Graphics Gems III).
    Computed in float64 and then cast to ``dtype``.
    """
    q = torch.randn(4, generator=generator, dtype=torch.float64)
    w, x, y, z = (q / q.norm()).tolist()
    R = torch.tensor([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ], dtype=torch.float64)
    return R.to(dtype=dtype, device=device)


def permutation_within_systems(batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation ``perm [N]`` that keeps every element in its system:
    ``batch[perm] == batch``; apply it as ``field[perm]``."""
    r = torch.rand(batch.shape[0], generator=generator).to(batch.device)
    shuffled = torch.argsort(r)
    grouped = shuffled[torch.argsort(batch[shuffled], stable=True)]  # random order inside each system
    perm = torch.empty_like(batch)
    perm[torch.argsort(batch, stable=True)] = grouped
    return perm


@dataclass(frozen=True)
class EquivarianceReport:
    """Largest deviations ``|fn(g . x) - g . fn(x)|`` over elements and trials, per field.

    Attributes:
        errors: field -> max absolute error.
        scales: field -> max ``|g . fn(x)|`` (the size the error is relative to).
        transforms: what ``g`` combined, e.g. ``("rotation", "translation", "permutation")``.
        trials: number of random ``g`` drawn.
    """

    errors: dict[str, float]
    scales: dict[str, float]
    transforms: tuple[str, ...]
    trials: int

    def relative(self) -> dict[str, float]:
        """field -> ``error / scale`` (the error itself where the scale is 0)."""
        return {k: e / self.scales[k] if self.scales[k] > 0 else e for k, e in self.errors.items()}

    def failures(self, atol: float, rtol: float) -> dict[str, float]:
        """Fields whose error exceeds ``atol + rtol * scale``, with that tolerance."""
        return {k: atol + rtol * self.scales[k] for k, e in self.errors.items()
                if not e <= atol + rtol * self.scales[k]}  # NaN fails

    def passed(self, atol: float, rtol: float) -> bool:
        return not self.failures(atol, rtol)

    def __str__(self) -> str:
        parts = [f"{k}: max error {e:.3g} (scale {self.scales[k]:.3g})" for k, e in self.errors.items()]
        return f"{' + '.join(self.transforms)} ({self.trials} trials): " + "; ".join(parts)


def _fields_of(state: State, names: Sequence[str], what: str) -> list[str]:
    for k in names:
        if k in state.keys() and state[k].shape[-1] != 3:
            raise ValueError(f"{what}: vector field {k!r} must have last dim 3, got {tuple(state[k].shape)}")
    return [k for k in names if k in state.keys()]


def _apply(state: State, rotation: Tensor | None, shift: Tensor | None, translated: Sequence[str],
           vectors: Sequence[str], perms: list[tuple[Tensor, Tensor]], what: str) -> State:
    """``g . state``: rotate ``vectors``, shift ``translated`` by ``shift [B, 3]``, permute flat fields."""
    data = {}
    for k, v in state.items():
        if rotation is not None and k in vectors:
            v = v @ rotation.to(v).t()
        if shift is not None and k in translated:
            s = shift.to(v)
            v = v + (s[state.batch[k]] if k in state.batch else s.reshape(s.shape[0], *[1] * (v.ndim - 2), 3))
        if k in state.batch:
            v = v[_perm_for(state.batch[k], perms, k, what)]
        data[k] = v
    return State(data, state.batch, state.num_systems, state.constraints)


def _perm_for(batch: Tensor, perms: list[tuple[Tensor, Tensor]], name: str, what: str) -> Tensor:
    """The permutation drawn for this batch index (fields sharing an index share a permutation)."""
    for b, p in perms:
        if b is batch or (b.shape == batch.shape and torch.equal(b, batch)):
            return p
    raise ValueError(
        f"{what}: output field {name!r} has a batch index that matches no input field's, so its "
        "permutation is unknown; pass permute=False"
    )


def check_equivariance(
    fn: Callable[[State], State],
    state: State,
    *,
    vector_fields: Sequence[str] = ("pos",),
    scalar_fields: Sequence[str] = ("h",),
    translate: bool | Sequence[str] = True,
    permute: bool = True,
    reflect: bool = False,
    trials: int = 3,
    generator: torch.Generator | None = None,
) -> EquivarianceReport:
    """Measure how far ``fn`` is from equivariance; see ``assert_equivariant`` for the arguments.

    Returns an ``EquivarianceReport`` with per-field max errors (nothing is asserted).
    """
    what = "check_equivariance"
    if trials < 1:
        raise ValueError(f"{what}: trials must be >= 1")
    if not isinstance(state, State):
        raise TypeError(f"{what}: state must be a sciddiff State, got {type(state).__name__}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    vectors = _fields_of(state, vector_fields, what)
    if translate is True:
        translated = vectors
    elif translate is False:
        translated = []
    else:
        translated = _fields_of(state, list(translate), what)
        if missing := [k for k in translate if k not in state.keys()]:
            raise ValueError(f"{what}: translate names fields {missing} that the input lacks")
    out = fn(state)
    checked = [k for k in dict.fromkeys([*vector_fields, *scalar_fields]) if k in out.keys()]
    if not checked:
        raise ValueError(f"{what}: fn's output has none of the fields {[*vector_fields, *scalar_fields]}")
    out_vectors = _fields_of(out, vector_fields, what)
    transforms = ("rotation" if not reflect else "rotation x reflection",) + \
        (("translation",) if translated else ()) + (("permutation",) if permute else ())
    errors = dict.fromkeys(checked, 0.0)
    scales = dict.fromkeys(checked, 0.0)
    for _ in range(trials):
        R = random_rotation(gen, state.dtype, state.device)
        if reflect:
            R = R @ torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=R.dtype, device=R.device))
        shift = torch.randn(state.num_systems, 3, generator=gen, dtype=torch.float64) * 3.0
        perms = []
        if permute:
            for b in state.batch.values():
                if not any(b is q or torch.equal(b, q) for q, _ in perms):
                    perms.append((b, permutation_within_systems(b, gen)))
        else:
            perms = [(b, torch.arange(b.shape[0], device=b.device)) for b in state.batch.values()]
            perms += [(b, torch.arange(b.shape[0], device=b.device)) for b in out.batch.values()]
        gx = _apply(state, R, shift.to(state.device), translated, vectors, perms, what)
        got = fn(gx)
        want = _apply(out, R, None, (), out_vectors, perms, what)
        for k in checked:
            if got[k].shape != want[k].shape:
                raise ValueError(f"{what}: field {k!r} changed shape under the transform: "
                                 f"{tuple(want[k].shape)} -> {tuple(got[k].shape)}")
            diff = (got[k] - want[k]).detach().abs()
            err = float(diff.max()) if diff.numel() else 0.0
            errors[k] = max(errors[k], err) if not math.isnan(err) else math.nan
            scales[k] = max(scales[k], float(want[k].detach().abs().max()) if want[k].numel() else 0.0)
    return EquivarianceReport(errors, scales, transforms, trials)


def assert_equivariant(
    fn: Callable[[State], State],
    state: State,
    *,
    vector_fields: Sequence[str] = ("pos",),
    scalar_fields: Sequence[str] = ("h",),
    translate: bool | Sequence[str] = True,
    permute: bool = True,
    reflect: bool = False,
    trials: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
    generator: torch.Generator | None = None,
) -> EquivarianceReport:
    """Assert ``fn(g . x) == g . fn(x)`` for ``trials`` random symmetry operations ``g``.

    ``g`` acts on a State as follows:

    - rotation ``R`` (Haar, det +1; times ``diag(-1, 1, 1)`` if ``reflect``): every field in
      ``vector_fields`` (last dim 3; flat ``[N, 3]`` or dense ``[B, ..., 3]``) becomes ``v R^T``,
      on the input and on the output;
    - translation: the input fields named by ``translate`` (``True``: all input
      ``vector_fields``) get a random shift per system; outputs must be unchanged
      (translation-invariant, as eps/score/velocity/force predictions are). Use
      ``translate=False`` for outputs that move with the input (positions, ``x0``);
    - permutation (``permute``): the elements of every flat field are shuffled within each
      system, the same shuffle for fields sharing a batch index, on input and output.

    Fields in ``scalar_fields`` must be invariant under rotation and translation and follow the
    permutation; output fields listed in neither list are not checked.

    Args:
        fn: ``State -> State``, e.g. ``lambda s: net(s, t)``.
        state: the input (B systems).
        atol, rtol: pass when ``max |error| <= atol + rtol * max |expected|`` per field
            (default: ``DEFAULT_TOL`` for the state's dtype).
        generator: for the random draws (default: a fresh generator seeded with 0).
    Returns:
        the ``EquivarianceReport`` (also when the check passes).
    Raises:
        AssertionError: naming each failing field with its max error, scale and tolerance.
    """
    d_atol, d_rtol = DEFAULT_TOL.get(state.dtype, DEFAULT_TOL[torch.float32])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    report = check_equivariance(fn, state, vector_fields=vector_fields, scalar_fields=scalar_fields,
                                translate=translate, permute=permute, reflect=reflect, trials=trials,
                                generator=generator)
    failures = report.failures(atol, rtol)
    if failures:
        lines = [f"field {k!r}: max error {report.errors[k]:.3g} > tolerance {tol:.3g} "
                 f"(scale {report.scales[k]:.3g})" for k, tol in failures.items()]
        raise AssertionError(
            f"not equivariant under {' + '.join(report.transforms)} ({report.trials} trials): "
            + "; ".join(lines)
        )
    return report
