"""Plain molecule records shared by the molecule adapter's modules (I/O, metrics, conversion).

Units: positions in Angstrom. Atom types of the QM9 model: H, C, N, O, F (EDM's order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._elements import symbol_of

ATOM_SYMBOLS: tuple[str, ...] = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS: tuple[int, ...] = (1, 6, 7, 8, 9)
SYMBOL_TO_Z: dict[str, int] = dict(zip(ATOM_SYMBOLS, ATOMIC_NUMBERS, strict=True))
Z_TO_SYMBOL: dict[int, str] = {z: s for s, z in SYMBOL_TO_Z.items()}
Z_TO_INDEX: dict[int, int] = {z: i for i, z in enumerate(ATOMIC_NUMBERS)}


@dataclass
class Molecule:
    """One molecule: ``numbers [N]`` (atomic numbers, int64), ``positions [N, 3]`` (Angstrom,
    float64), optional ``charges [N]`` (formal charges, int64), a name and free-form properties."""

    numbers: np.ndarray
    positions: np.ndarray
    charges: np.ndarray | None = None
    name: str = ""
    properties: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64)
        n = self.numbers.shape[0]
        if self.positions.shape != (n, 3):
            raise ValueError(
                f"Molecule {self.name!r}: positions must have shape ({n}, 3), got {self.positions.shape}"
            )
        if not np.isfinite(self.positions).all():
            raise ValueError(f"Molecule {self.name!r}: positions contain NaN or Inf")
        if self.charges is not None:
            self.charges = np.asarray(self.charges, dtype=np.int64).reshape(-1)
            if self.charges.shape[0] != n:
                raise ValueError(f"Molecule {self.name!r}: {self.charges.shape[0]} charges for {n} atoms")

    def __len__(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def symbols(self) -> list[str]:
        return [symbol_of(int(z)) for z in self.numbers]
