"""Shared fixtures: both float dtypes with a tolerance for each, and a seeded generator."""

from __future__ import annotations

import pytest
import torch

# The tests use small tensors: intra-op threads cost more in synchronisation than they save, and on
# a loaded 2-core machine one torch.softmax of a [6, 3] tensor took ~15 ms with 2 threads.
torch.set_num_threads(1)

DTYPES = (torch.float32, torch.float64)

#: ``torch.testing.assert_close`` tolerances for closed-form identities, per dtype.
TOL = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def tol(dtype) -> dict:
    return TOL[dtype]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
