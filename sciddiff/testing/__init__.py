"""Exact-score testbeds and checking helpers, shipped so users can test their own models."""

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
    "ExactDenoiser", "GaussianMixture", "WrappedNormalMixture", "ZeroCoMGaussian",
    "random_mixture", "ring_mixture", "torus_state",
]
