"""The shipped symmetry checks: Haar rotations, within-system permutations, and
``assert_equivariant`` / ``check_equivariance`` on toy functions that are (not) equivariant."""

from __future__ import annotations

import math

import pytest
import torch

from sciddiff.core import State, ZeroCoM
from sciddiff.testing._equivariance import (
    EquivarianceReport,
    assert_equivariant,
    check_equivariance,
    permutation_within_systems,
    random_rotation,
)

SIZES = (4, 1, 6, 3)


def _state(dtype: torch.dtype, seed: int = 0) -> State:
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))
    batch = batch[torch.randperm(batch.shape[0], generator=g)]  # systems interleaved: order must not matter
    n = batch.shape[0]
    pos = torch.randn(n, 3, generator=g, dtype=dtype)
    h = torch.randn(n, 2, generator=g, dtype=dtype)
    return State({"pos": pos, "h": h}, {"pos": batch, "h": batch}, len(SIZES), {"pos": ZeroCoM()})


def _segment_mean(x, batch, b):
    s = x.new_zeros(b, x.shape[1]).index_add_(0, batch, x)
    return (s / torch.bincount(batch, minlength=b).to(x)[:, None])[batch]


def toy_equivariant(s: State) -> State:
    """E(3)-equivariant, translation-invariant vectors, invariant scalars, permutation-equivariant:
    ``v_i = sum_j w(|r_ij|, h_j) r_ij`` with ``r_ij = x_i - x_j`` over the system."""
    pos, h, batch = s["pos"], s["h"], s.batch["pos"]
    same = batch[:, None] == batch[None, :]
    r = pos[:, None, :] - pos[None, :, :]
    w = torch.exp(-r.square().sum(-1)) * (1 + h[None, :, 0] ** 2) * same
    v = (w[..., None] * r).sum(1)
    hs = torch.stack([(w * h[None, :, 1]).sum(1), r.square().sum(-1).mul(same).sum(1)], dim=1)
    return s.replace(pos=v, h=hs)


def test_random_rotation_is_a_rotation(dtype):
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        R = random_rotation(g, dtype)
        assert R.dtype == dtype and R.shape == (3, 3)
        eye = torch.eye(3, dtype=dtype)
        tol = 1e-6 if dtype == torch.float32 else 1e-13
        torch.testing.assert_close(R @ R.T, eye, atol=tol, rtol=0)
        assert abs(float(torch.linalg.det(R)) - 1.0) < tol


def test_random_rotation_is_haar():
    """Closed-form moments of Haar measure on SO(3): the trace (the character of the 3-dim irrep)
    has E[tr] = 0 and E[tr^2] = 1; a rotated unit vector is uniform on the sphere,
    E[(R e_z)_i^2] = 1/3. A biased sampler (e.g. Euler angles drawn uniformly) fails these."""
    g = torch.Generator().manual_seed(2)
    n = 4000
    Rs = torch.stack([random_rotation(g) for _ in range(n)])
    tr = Rs.diagonal(dim1=1, dim2=2).sum(-1)
    # tr in [-1, 3]; std of tr is 1 and of tr^2 is sqrt(E tr^4 - 1) = sqrt(2): 5-sigma bounds.
    assert abs(float(tr.mean())) < 5 / math.sqrt(n)
    assert abs(float(tr.square().mean()) - 1) < 5 * math.sqrt(2) / math.sqrt(n)
    col = Rs[:, :, 2]
    assert torch.all((col.square().mean(0) - 1 / 3).abs() < 5 * 0.3 / math.sqrt(n))
    assert torch.all(col.mean(0).abs() < 5 * 0.58 / math.sqrt(n))


def test_permutation_within_systems_keeps_systems_and_is_random():
    batch = torch.tensor([2, 0, 1, 0, 2, 2, 0, 1, 2])
    g = torch.Generator().manual_seed(3)
    seen = set()
    for _ in range(200):
        p = permutation_within_systems(batch, g)
        assert torch.equal(batch[p], batch)
        assert sorted(p.tolist()) == list(range(9))
        seen.add(tuple(p.tolist()))
    # 3! * 2! * 4! = 288 permutations exist; 200 draws hit many of them (a fixed one would hit 1).
    assert len(seen) > 100


def test_toy_function_passes(dtype):
    s = _state(dtype)
    rep = assert_equivariant(toy_equivariant, s, reflect=True)
    assert isinstance(rep, EquivarianceReport)
    assert rep.transforms == ("rotation x reflection", "translation", "permutation")
    assert set(rep.errors) == {"pos", "h"} and rep.scales["pos"] > 0.1
    assert max(rep.relative().values()) < (1e-5 if dtype == torch.float32 else 1e-12)


def test_fixed_direction_breaks_rotation(dtype):
    """A constant vector added to the output is translation-invariant and permutation-equivariant
    but not rotation-equivariant: the check must fail and name the field."""

    def fn(s):
        out = toy_equivariant(s)
        return out.replace(pos=out["pos"] + torch.tensor([0.5, 0.0, 0.0], dtype=dtype))

    s = _state(dtype)
    with pytest.raises(AssertionError, match=r"field 'pos': max error .* > tolerance") as exc:
        assert_equivariant(fn, s)
    assert "'h'" not in str(exc.value)  # the scalar field is fine
    rep = check_equivariance(fn, s)
    assert rep.errors["pos"] > 0.1 and rep.relative()["h"] < 1e-4


def test_order_dependence_breaks_permutation(dtype):
    def fn(s):
        out = toy_equivariant(s)
        idx = torch.arange(out["h"].shape[0], dtype=dtype)
        return out.replace(h=out["h"] * (1 + idx[:, None]))

    s = _state(dtype)
    with pytest.raises(AssertionError, match="field 'h'"):
        assert_equivariant(fn, s)
    assert_equivariant(fn, s, permute=False)  # rotations and translations alone are fine


def test_positions_are_not_translation_invariant(dtype):
    """The identity on positions is rotation- and permutation-equivariant; its output moves with a
    translation, so it fails the default (translation-invariant) check and passes without it."""

    def fn(s):
        return s

    s = _state(dtype)
    with pytest.raises(AssertionError, match="translation"):
        assert_equivariant(fn, s)
    assert_equivariant(fn, s, translate=False)


def test_chiral_function_fails_only_with_reflection(dtype):
    """A triple product (pseudoscalar) is invariant under rotations but flips under reflections."""

    def fn(s):
        out = toy_equivariant(s)
        batch = s.batch["pos"]
        x = s["pos"] - _segment_mean(s["pos"], batch, s.num_systems)
        # a second equivariant vector per system, w = sum_j |x_j|^2 x_j, then p_i = x_i . (v_i x w)
        w = torch.zeros_like(x).index_add_(0, batch, x.square().sum(-1, keepdim=True) * x)[batch]
        chir = (x * torch.linalg.cross(out["pos"], w)).sum(-1)
        return out.replace(h=torch.stack([out["h"][:, 0], chir], dim=1))

    s = _state(dtype)
    assert_equivariant(fn, s)
    rep = check_equivariance(fn, s, reflect=True)
    assert rep.relative()["h"] > 1e-2
    with pytest.raises(AssertionError, match="rotation x reflection"):
        assert_equivariant(fn, s, reflect=True)


def test_dense_vector_field_and_translate_list():
    """Dense ``[B, K, 3]`` vector fields rotate too; ``translate`` may name the fields to shift."""
    g = torch.Generator().manual_seed(4)
    s = State({"frame": torch.randn(3, 2, 3, generator=g, dtype=torch.float64),
               "vel": torch.randn(3, 2, 3, generator=g, dtype=torch.float64)})

    def fn(st):  # frame differences (translation-invariant) plus a velocity
        return st.replace(frame=st["frame"] - st["frame"].flip(1), vel=st["vel"] * 2)

    assert_equivariant(fn, s, vector_fields=("frame", "vel"), scalar_fields=(), translate=["frame"])
    with pytest.raises(AssertionError, match="field 'vel'"):
        assert_equivariant(fn, s, vector_fields=("frame", "vel"), scalar_fields=(), translate=True)


def test_clear_errors():
    s = _state(torch.float64)
    with pytest.raises(ValueError, match="none of the fields"):
        check_equivariance(toy_equivariant, s, vector_fields=("x",), scalar_fields=("y",))
    with pytest.raises(ValueError, match="last dim 3"):
        check_equivariance(toy_equivariant, s, vector_fields=("h",))
    with pytest.raises(ValueError, match="trials"):
        check_equivariance(toy_equivariant, s, trials=0)
    with pytest.raises(ValueError, match="lacks"):
        check_equivariance(toy_equivariant, s, translate=["nope"])

    def new_index(st):  # an output with its own batch index: its permutation is unknown
        b = st.batch["pos"].clone()
        return State({"h": st["h"]}, {"h": b[torch.argsort(b, stable=True)]}, st.num_systems)

    with pytest.raises(ValueError, match="permute=False"):
        check_equivariance(new_index, s)


def test_nan_output_fails():
    s = _state(torch.float64)
    with pytest.raises(AssertionError, match="nan"):
        assert_equivariant(lambda st: st.replace(h=st["h"] * math.nan), s, vector_fields=(), translate=False)
