"""Constraints: zero centre of mass, flat torus and masked (known) entries."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from sciddiff.core import Euclidean, FlatTorus, Level, Masked, State, ZeroCoM

SIZES = [3, 1, 5, 2]
B = len(SIZES)


def _flat(dtype, gen, shuffle=True):
    idx = torch.repeat_interleave(torch.arange(B), torch.tensor(SIZES))
    if shuffle:
        idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(5))]
    x = torch.randn(idx.numel(), 3, generator=gen, dtype=dtype) + 4.0  # far from zero CoM
    return x, idx


def _com(x, idx):
    s = torch.zeros(B, x.shape[1], dtype=x.dtype).index_add_(0, idx, x)
    return s / torch.bincount(idx, minlength=B).to(x.dtype)[:, None]


# ZeroCoM ----------------------------------------------------------------------------------------
def test_zero_com_flat_project(dtype, tol, gen):
    x, idx = _flat(dtype, gen)
    c = ZeroCoM()
    p = c.project(x, idx, B)
    assert p.shape == x.shape and p.dtype == dtype
    assert_close(_com(p, idx), torch.zeros(B, 3, dtype=dtype), **tol)
    assert_close(c.project(p, idx, B), p, **tol)  # idempotent
    # it removes exactly each system's mean (orthogonal projection)
    assert_close(x - p, _com(x, idx)[idx], **tol)
    y = torch.randn(x.shape, generator=gen, dtype=dtype)
    resid = torch.zeros(B, dtype=dtype).index_add_(0, idx, ((x - p) * c.project(y, idx, B)).sum(1))
    assert_close(resid, torch.zeros(B, dtype=dtype), **tol)
    # a level changes nothing for a linear subspace
    assert_close(c.project(x, idx, B, Level(0.5, 0.5)), p, **tol)


def test_zero_com_dense_project(dtype, tol, gen):
    x = torch.randn(4, 6, 3, generator=gen, dtype=dtype) + 2.0
    c = ZeroCoM()
    p = c.project(x, None, 4)
    assert_close(p.mean(1), torch.zeros(4, 3, dtype=dtype), **tol)
    assert_close(c.project(p, None, 4), p, **tol)
    assert_close(x - p, x.mean(1, keepdim=True).expand_as(x), **tol)
    # a flat field without its batch index would silently average over the coordinates
    with pytest.raises(ValueError, match="need their batch index"):
        c.project(x[0], None, 1)


def test_zero_com_noise_and_prior_in_subspace(dtype, tol, gen):
    x, idx = _flat(dtype, gen)
    c = ZeroCoM()
    z = torch.randn(x.shape, generator=gen, dtype=dtype)
    n = c.project_noise(z, idx, B)
    assert_close(_com(n, idx), torch.zeros(B, 3, dtype=dtype), **tol)
    assert_close(n, c.project(z, idx, B), **tol)
    pr = c.prior(z, 3.0, idx, B)
    assert_close(pr, 3.0 * n, **tol)
    d = c.project_noise(torch.randn(5, 4, 3, generator=gen, dtype=dtype), None, 5)
    assert_close(d.mean(1), torch.zeros(5, 3, dtype=dtype), **tol)


def test_zero_com_noise_variance():
    """Projected noise has per-coordinate variance (N-1)/N: it is standard normal in the subspace."""
    g = torch.Generator().manual_seed(0)
    n = ZeroCoM().project_noise(torch.randn(20000, 4, 3, generator=g, dtype=torch.float64), None, 20000)
    assert abs(float(n.var()) - 0.75) < 0.01
    assert abs(float(n.square().sum((1, 2)).mean()) - 9.0) < 0.1  # E||n||^2 = dof = (N-1) d


def test_zero_com_dof():
    x, idx = _flat(torch.float32, torch.Generator().manual_seed(0))
    assert ZeroCoM().dof(x, idx, B).tolist() == [(n - 1) * 3 for n in SIZES]
    assert ZeroCoM().dof(torch.zeros(2, 7, 3), None, 2).tolist() == [18.0, 18.0]


# FlatTorus --------------------------------------------------------------------------------------
def test_torus_canonical(dtype, tol, gen):
    c = FlatTorus()
    x = torch.randn(200, 3, generator=gen, dtype=dtype) * 5
    w = c.canonical(x)
    assert bool(((w >= 0) & (w < 1)).all())
    assert_close(w - x, torch.round(w - x), **tol)  # differs by integers
    assert_close(c.canonical(w), w, **tol)
    edge = torch.tensor([-1e-9, -1e-20, -0.0, 0.0, 1.0, -1.0, 2.0 - 1e-12, 0.25, -0.25], dtype=dtype)
    we = c.canonical(edge)
    assert bool(((we >= 0) & (we < 1)).all()), we.tolist()  # remainder(-tiny, 1) rounds to 1.0
    assert_close(we[-2:], torch.tensor([0.25, 0.75], dtype=dtype), **tol)


def test_torus_difference(dtype, tol, gen):
    c = FlatTorus()
    a = torch.rand(300, 2, generator=gen, dtype=dtype)
    b = torch.rand(300, 2, generator=gen, dtype=dtype)
    d = c.difference(a, b)
    assert bool(((d >= -0.5) & (d < 0.5)).all())
    assert_close(d - (a - b), torch.round(d - (a - b)), **tol)  # an image of a - b
    # the shortest image: |d| <= |a - b + k| for every integer k
    for k in (-1.0, 1.0):
        assert bool((d.abs() <= (a - b + k).abs() + 1e-6).all())
    # periodic in both arguments
    ka = torch.randint(-3, 4, a.shape, generator=gen).to(dtype)
    kb = torch.randint(-3, 4, a.shape, generator=gen).to(dtype)
    assert_close(c.difference(a + ka, b + kb), d, **tol)
    # small displacements are returned as they are
    small = (torch.rand(50, generator=gen, dtype=dtype) - 0.5) * 0.8
    assert_close(c.difference(small + 0.3, torch.full_like(small, 0.3)), small, **tol)
    half = c.difference(torch.tensor([0.75], dtype=dtype), torch.tensor([0.25], dtype=dtype))
    assert float(half) == -0.5  # the half-open interval [-1/2, 1/2)


def test_torus_prior_and_flags(dtype, gen):
    c = FlatTorus()
    assert c.needs_variance_exploding and not ZeroCoM().needs_variance_exploding
    z = torch.randn(4000, generator=gen, dtype=dtype)
    u = c.prior(z, 5.0, None, 4000)
    assert bool(((u >= 0) & (u <= 1)).all()) and u.dtype == dtype
    assert abs(float(u.mean()) - 0.5) < 0.03 and abs(float(u.var()) - 1 / 12) < 0.01
    assert torch.equal(c.project(z, None, 4000), z)  # dynamics on the covering space
    assert torch.equal(c.project_noise(z, None, 4000), z)


# Masked -----------------------------------------------------------------------------------------
def _masked_setup(dtype, gen, shape=(4, 5)):
    mask = torch.rand(shape, generator=gen) < 0.4
    known = torch.randn(shape, generator=gen, dtype=dtype)
    return mask, known


@pytest.mark.parametrize("per_system", [False, True])
def test_masked_project_at_level(dtype, tol, gen, per_system):
    mask, known = _masked_setup(dtype, gen)
    m = Masked.create(mask, known, generator=gen)
    x = torch.randn(4, 5, generator=gen, dtype=dtype)
    if per_system:
        a = torch.rand(4, generator=gen, dtype=dtype)
        s = torch.rand(4, generator=gen, dtype=dtype)
        lvl, ac, sc = Level(a, s), a[:, None], s[:, None]
    else:
        a, s = torch.tensor(0.6, dtype=dtype), torch.tensor(0.8, dtype=dtype)
        lvl, ac, sc = Level(a, s), a, s
    p = m.project(x, None, 4, lvl)
    assert_close(p[mask], (ac * known + sc * m.noise).expand(4, 5)[mask], **tol)
    assert torch.equal(p[~mask], x[~mask])
    # exact known values without a level
    p0 = m.project(x, None, 4)
    assert torch.equal(p0[mask], known[mask]) and torch.equal(p0[~mask], x[~mask])


def test_masked_flat_per_system_level(dtype, tol, gen):
    idx = torch.tensor([0, 1, 1, 2, 0, 2])
    mask = torch.tensor([[True, False], [False, False], [True, True], [False, True], [False, False],
                         [True, False]])
    known = torch.randn(6, 2, generator=gen, dtype=dtype)
    noise = torch.randn(6, 2, generator=gen, dtype=dtype)
    m = Masked(mask, known, noise)
    a = torch.tensor([0.9, 0.5, 0.1], dtype=dtype)
    s = torch.tensor([0.2, 0.7, 1.3], dtype=dtype)
    x = torch.randn(6, 2, generator=gen, dtype=dtype)
    p = m.project(x, idx, 3, Level(a, s))
    want = torch.where(mask, a[idx, None] * known + s[idx, None] * noise, x)
    assert_close(p, want, **tol)


def test_masked_with_inner_zero_com(dtype, tol, gen):
    x = torch.randn(3, 4, 2, generator=gen, dtype=dtype)
    mask = torch.zeros(3, 4, 2, dtype=torch.bool)
    mask[:, 0] = True
    known = torch.randn(3, 4, 2, generator=gen, dtype=dtype)
    m = Masked(mask, known, torch.zeros_like(known), inner=ZeroCoM())
    z = torch.randn(3, 4, 2, generator=gen, dtype=dtype)
    assert_close(m.project_noise(z, None, 3), ZeroCoM().project_noise(z, None, 3), **tol)
    p = m.project(x, None, 3)
    assert torch.equal(p[mask], known[mask])
    assert_close(p[~mask], ZeroCoM().project(x, None, 3)[~mask], **tol)
    assert_close(m.prior(z, 2.0, None, 3), 2.0 * ZeroCoM().project_noise(z, None, 3), **tol)
    assert m.dof(x, None, 3).tolist() == [4.0, 4.0, 4.0]  # (4-1)*2 - 2 known


def test_masked_follows_the_field_dtype(gen):
    """Known values stored in float64 serve a float32 field (as after ``State.to``)."""
    mask, known = _masked_setup(torch.float64, gen)
    m = Masked.create(mask, known, generator=gen)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float32)
    p = m.project(x, None, 4, Level(0.3, 0.4))
    assert p.dtype == torch.float32 and m.known.dtype == torch.float32
    assert_close(p[mask], (0.3 * known + 0.4 * m.noise.double())[mask].float())
    assert torch.equal(p[~mask], x[~mask])


def test_masked_create_reproducible(dtype, gen):
    mask, known = _masked_setup(dtype, gen)
    a = Masked.create(mask, known, generator=torch.Generator().manual_seed(3))
    b = Masked.create(mask, known, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.noise, b.noise) and a.noise.dtype == dtype
    assert isinstance(a.inner, Euclidean)


def test_masked_in_state_projection(dtype, tol, gen):
    mask, known = _masked_setup(dtype, gen)
    m = Masked.create(mask, known, generator=gen)
    st = State({"x": torch.randn(4, 5, generator=gen, dtype=dtype)}, constraints={"x": m})
    p = st.project(Level(torch.tensor(0.3, dtype=dtype), torch.tensor(0.4, dtype=dtype)))
    assert_close(p["x"][mask], (0.3 * known + 0.4 * m.noise)[mask], **tol)


def test_masked_validation():
    mask = torch.zeros(3, 2, dtype=torch.bool)
    z = torch.zeros(3, 2)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        Masked(mask.float(), z, z)
    with pytest.raises(ValueError, match=r"mask \(3, 2\), known \(3, 3\) and noise \(3, 2\)"):
        Masked(mask, torch.zeros(3, 3), z)
    with pytest.raises(ValueError, match="same shape"):
        Masked(mask, z, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="torus are not supported"):
        Masked(mask, z, z, inner=FlatTorus())


def test_euclidean_trivial(dtype, gen):
    e = Euclidean()
    x = torch.randn(3, 2, generator=gen, dtype=dtype)
    y = torch.randn(3, 2, generator=gen, dtype=dtype)
    assert e.project(x, None, 3) is x and e.project_noise(x, None, 3) is x and e.canonical(x) is x
    assert torch.equal(e.difference(x, y), x - y)
    assert torch.equal(e.prior(x, 2.0, None, 3), 2 * x)
    assert e.dof(x, None, 3).tolist() == [2.0, 2.0, 2.0]
    assert e.dof(x, torch.tensor([0, 0, 2]), 3).tolist() == [4.0, 0.0, 2.0]


def test_level_is_frozen():
    lvl = Level(1.0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lvl.alpha = 2.0
