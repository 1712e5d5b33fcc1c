"""Exact-score testbeds and checking helpers, shipped so users can test their own models."""

from ._equivariance import (
    DEFAULT_TOL,
    EquivarianceReport,
    assert_equivariant,
    check_equivariance,
    permutation_within_systems,
    random_rotation,
)
from ._gmm import (
    ExactDenoiser,
    GaussianMixture,
    WrappedNormalMixture,
    ZeroCoMGaussian,
    random_mixture,
    ring_mixture,
    torus_state,
)

__all__ = [
    "DEFAULT_TOL", "EquivarianceReport", "assert_equivariant", "check_equivariance",
    "permutation_within_systems", "random_rotation",
    "ExactDenoiser", "GaussianMixture", "WrappedNormalMixture", "ZeroCoMGaussian",
    "random_mixture", "ring_mixture", "torus_state",
]
