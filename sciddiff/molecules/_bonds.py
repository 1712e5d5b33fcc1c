"""EDM's bond-length rule: bond orders from interatomic distances, allowed valences, RDKit molecules.

Port of ``qm9/bond_analyze.py`` and ``build_molecule`` of Hoogeboom et al. 2022, "Equivariant
Diffusion for Molecule Generation in 3D" (ICML; github ehoogeboom/e3_diffusion_for_molecules).
Reference lengths (pm) are EDM's, taken there from wiredchemist.com and chemistry-reference.com;
the margins (10, 5, 3 pm) were tuned by EDM to maximise the stability of QM9's own molecules.

A pair ``(a, b)`` at distance ``d`` (pm) gets order 0 if ``d >= bonds1 + margin1``; otherwise 2 if
``(a, b)`` has a double-bond length and ``d < bonds2 + margin2`` (3 if it also has a triple-bond
length and ``d < bonds3 + margin3``), else 1. Comparisons are strict, as in EDM.

EDM's tables are symmetric except ``bonds2["C"]["S"]`` (no ``["S"]["C"]``), so C=S exists only when
the C atom comes first. Like EDM's ``check_stability``, atoms ``i < j`` are looked up as
``(atom_i, atom_j)``. (EDM's validity path sorts each pair by its dataset's type index instead; for
QM9's H, C, N, O, F both agree.)

Distances are computed as EDM computes them: positions in float32, then
``sqrt((dx^2 + dy^2) + dz^2)`` in float32. This matters only for pairs within ~1e-5 pm of a
threshold (possible for samples on a coordinate grid, such as G-SchNet's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from ._types import Molecule

if TYPE_CHECKING:  # pragma: no cover
    from rdkit import Chem

#: Single-bond lengths in pm (EDM ``bonds1``).
BONDS1: dict[str, dict[str, int]] = {
    "H": {"H": 74, "C": 109, "N": 101, "O": 96, "F": 92, "B": 119, "Si": 148, "P": 144, "As": 152,
          "S": 134, "Cl": 127, "Br": 141, "I": 161},
    "C": {"H": 109, "C": 154, "N": 147, "O": 143, "F": 135, "Si": 185, "P": 184, "S": 182, "Cl": 177,
          "Br": 194, "I": 214},
    "N": {"H": 101, "C": 147, "N": 145, "O": 140, "F": 136, "Cl": 175, "Br": 214, "S": 168, "I": 222,
          "P": 177},
    "O": {"H": 96, "C": 143, "N": 140, "O": 148, "F": 142, "Br": 172, "S": 151, "P": 163, "Si": 163,
          "Cl": 164, "I": 194},
    "F": {"H": 92, "C": 135, "N": 136, "O": 142, "F": 142, "S": 158, "Si": 160, "Cl": 166, "Br": 178,
          "P": 156, "I": 187},
    "B": {"H": 119, "Cl": 175},
    "Si": {"Si": 233, "H": 148, "C": 185, "O": 163, "S": 200, "F": 160, "Cl": 202, "Br": 215, "I": 243},
    "Cl": {"Cl": 199, "H": 127, "C": 177, "N": 175, "O": 164, "P": 203, "S": 207, "B": 175, "Si": 202,
           "F": 166, "Br": 214},
    "S": {"H": 134, "C": 182, "N": 168, "O": 151, "S": 204, "F": 158, "Cl": 207, "Br": 225, "Si": 200,
          "P": 210, "I": 234},
    "Br": {"Br": 228, "H": 141, "C": 194, "O": 172, "N": 214, "Si": 215, "S": 225, "F": 178, "Cl": 214,
           "P": 222},
    "P": {"P": 221, "H": 144, "C": 184, "O": 163, "Cl": 203, "S": 210, "F": 156, "N": 177, "Br": 222},
    "I": {"H": 161, "C": 214, "Si": 243, "N": 222, "O": 194, "S": 234, "F": 187, "I": 266},
    "As": {"H": 152},
}
#: Double-bond lengths in pm (EDM ``bonds2``).
BONDS2: dict[str, dict[str, int]] = {
    "C": {"C": 134, "N": 129, "O": 120, "S": 160},
    "N": {"C": 129, "N": 125, "O": 121},
    "O": {"C": 120, "N": 121, "O": 121, "P": 150},
    "P": {"O": 150, "S": 186},
    "S": {"P": 186},
}
#: Triple-bond lengths in pm (EDM ``bonds3``).
BONDS3: dict[str, dict[str, int]] = {
    "C": {"C": 120, "N": 116, "O": 113},
    "N": {"C": 116, "N": 110},
    "O": {"C": 113},
}
#: EDM's tolerances (pm) added to the single, double and triple reference lengths.
MARGIN1, MARGIN2, MARGIN3 = 10, 5, 3
#: Allowed total bond order per element (EDM ``allowed_bonds``): an int or the allowed set.
ALLOWED_BONDS: dict[str, int | tuple[int, ...]] = {
    "H": 1, "C": 4, "N": 3, "O": 2, "F": 1, "B": 3, "Al": 3, "Si": 4, "P": (3, 5), "S": 4, "Cl": 1,
    "As": 3, "Br": 1, "I": 1, "Hg": (1, 2), "Bi": (3, 5),
}

# Atomic numbers of every element in the tables (some lie beyond ``_elements``' first 4 periods).
_Z = {"H": 1, "B": 5, "C": 6, "N": 7, "O": 8, "F": 9, "Al": 13, "Si": 14, "P": 15, "S": 16, "Cl": 17,
      "As": 33, "Br": 35, "I": 53, "Hg": 80, "Bi": 83}
_SYMBOL = {z: s for s, z in _Z.items()}
_NZ = max(_Z.values()) + 1
_MAX_VALENCE = 8  # column count of the allowed-valence table; sums above it are never allowed

MissingPair = Literal["raise", "no_bond"]


def get_bond_order(atom1: str, atom2: str, distance: float, check_exists: bool = False) -> int:
    """EDM's ``get_bond_order``: bond order (0-3) of two elements ``distance`` Angstrom apart.

    Hoogeboom et al. 2022 (EDM), ``qm9/bond_analyze.py``. With ``check_exists`` a pair without a
    single-bond length gets 0 (EDM's GEOM mode); otherwise it raises ``KeyError`` as EDM does.
    """
    distance = 100 * distance  # Angstrom -> pm
    if check_exists and (atom1 not in BONDS1 or atom2 not in BONDS1[atom1]):
        return 0
    if distance < BONDS1[atom1][atom2] + MARGIN1:
        if atom1 in BONDS2 and atom2 in BONDS2[atom1]:
            if distance < BONDS2[atom1][atom2] + MARGIN2:
                if atom1 in BONDS3 and atom2 in BONDS3[atom1] and distance < BONDS3[atom1][atom2] + MARGIN3:
                    return 3
                return 2
        return 1
    return 0


def _threshold_table(lengths: dict[str, dict[str, int]], margin: int, missing: float) -> np.ndarray:
    """``[Z_max+1, Z_max+1]`` float64 table of ``length + margin`` (pm), ``missing`` where absent."""
    out = np.full((_NZ, _NZ), missing)
    for a, row in lengths.items():
        for b, length in row.items():
            out[_Z[a], _Z[b]] = length + margin
    return out


# NaN marks "no single-bond length" (an error or no bond); -inf makes "d < thr" false for 2/3.
_THR1 = _threshold_table(BONDS1, MARGIN1, np.nan)
_THR2 = _threshold_table(BONDS2, MARGIN2, -np.inf)
_THR3 = _threshold_table(BONDS3, MARGIN3, -np.inf)


def _allowed_table() -> np.ndarray:
    """``[Z_max+1, _MAX_VALENCE+1]`` bool: ``[z, v]`` true when total bond order ``v`` is allowed."""
    out = np.zeros((_NZ, _MAX_VALENCE + 1), dtype=bool)
    for s, v in ALLOWED_BONDS.items():
        out[_Z[s], list(v) if isinstance(v, tuple) else [v]] = True
    return out


_ALLOWED = _allowed_table()
_KNOWN = np.zeros(_NZ, dtype=bool)
_KNOWN[list(_SYMBOL)] = True
_HAS_VALENCE = _ALLOWED.any(axis=1)


def pairwise_distances_pm(positions: np.ndarray) -> np.ndarray:
    """EDM-style distances in pm: ``positions [..., N, 3]`` (Angstrom) -> ``[..., N, N]`` float64.

    The distance is taken in float32 as ``sqrt((dx^2 + dy^2) + dz^2)`` (EDM's float32 tensors), then
    scaled by 100 in float64 (EDM's ``100 * dist`` on a NumPy float32 scalar under NumPy 1.x).
    """
    p = np.asarray(positions, dtype=np.float32)
    d = p[..., :, None, :] - p[..., None, :, :]
    sq = (d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]) + d[..., 2] * d[..., 2]
    return np.sqrt(sq).astype(np.float64) * 100.0


def _check_known(numbers: np.ndarray, what: str = "") -> None:
    bad = (numbers < 1) | (numbers >= _NZ)
    bad[~bad] = ~_KNOWN[numbers[~bad]]
    if bad.any():
        where = f"{what}: " if what else ""
        raise ValueError(
            f"{where}atomic number(s) {sorted(set(numbers[bad].tolist()))} have no EDM bond lengths "
            f"(known: {', '.join(_Z)})"
        )


def _missing_pair(numbers: np.ndarray) -> tuple[str, str] | None:
    """A pair of elements present in ``numbers [N]`` (as two distinct atoms) that has no EDM
    single-bond length, or None. EDM's QM9 code raises ``KeyError`` on such a pair."""
    zs, counts = np.unique(numbers, return_counts=True)
    for a in range(len(zs)):
        for b in range(a if counts[a] > 1 else a + 1, len(zs)):
            if np.isnan(_THR1[zs[a], zs[b]]) or np.isnan(_THR1[zs[b], zs[a]]):
                return _SYMBOL[int(zs[a])], _SYMBOL[int(zs[b])]
    return None


def _orders_from_distances(numbers: np.ndarray, dist_pm: np.ndarray) -> np.ndarray:
    """Bond orders ``[..., N, N]`` int64 from ``numbers [..., N]`` and distances ``[..., N, N]`` pm;
    a pair without a single-bond length gets no bond (check ``_missing_pair`` first for EDM's QM9
    behaviour)."""
    zi, zj = numbers[..., :, None], numbers[..., None, :]
    below1 = dist_pm < np.nan_to_num(_THR1[zi, zj], nan=-np.inf)
    below2 = below1 & (dist_pm < _THR2[zi, zj])
    below3 = below2 & (dist_pm < _THR3[zi, zj])
    orders = np.triu(below1.astype(np.int64) + below2 + below3, 1)  # EDM looks up (z_i, z_j), i < j
    return orders + np.swapaxes(orders, -1, -2)


def bond_orders(numbers: np.ndarray, positions: np.ndarray, missing: MissingPair = "raise") -> np.ndarray:
    """EDM bond orders of one molecule, vectorised.

    Same result as EDM's double loop over pairs ``i < j`` calling ``get_bond_order`` (Hoogeboom et
    al. 2022), with EDM's float32 distances (see the module docstring).

    Args:
        numbers: ``[N]`` atomic numbers.
        positions: ``[N, 3]`` Angstrom.
        missing: ``"raise"`` (EDM's QM9 mode) for a pair of elements without a single-bond length,
            or ``"no_bond"`` (EDM's ``check_exists``, its GEOM mode).

    Returns:
        ``[N, N]`` int64, symmetric, zero diagonal: 0 none, 1 single, 2 double, 3 triple.
    """
    numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
    positions = np.asarray(positions)
    if positions.shape != (numbers.shape[0], 3):
        raise ValueError(f"positions must have shape ({numbers.shape[0]}, 3), got {positions.shape}")
    if missing not in ("raise", "no_bond"):
        raise ValueError(f"missing must be 'raise' or 'no_bond', got {missing!r}")
    _check_known(numbers)
    pair = _missing_pair(numbers) if missing == "raise" else None
    if pair is not None:
        raise ValueError(
            f"no EDM single-bond length for the pair {pair[0]}-{pair[1]}; pass missing='no_bond' to "
            "treat such pairs as unbonded (EDM's check_exists)"
        )
    return _orders_from_distances(numbers, pairwise_distances_pm(positions))


def atom_stable(numbers: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """EDM atom stability: ``numbers [..., N]``, ``orders [..., N, N]`` -> ``[..., N]`` bool, true where
    the atom's total bond order is an allowed valence (``ALLOWED_BONDS``; Hoogeboom et al. 2022)."""
    numbers = np.asarray(numbers, dtype=np.int64)
    if not _HAS_VALENCE[numbers].all():
        bad = sorted({_SYMBOL.get(int(z), str(int(z))) for z in numbers[~_HAS_VALENCE[numbers]]})
        raise ValueError(f"no EDM allowed valence for element(s) {bad}")
    valence = orders.sum(axis=-1)
    return _ALLOWED[numbers, np.minimum(valence, _MAX_VALENCE)] & (valence <= _MAX_VALENCE)


def edm_rwmol(numbers: np.ndarray, orders: np.ndarray) -> Chem.RWMol:
    """EDM's ``build_molecule``: atoms in order, then bonds ``(i, j)`` for ``i > j`` in row-major
    order (EDM's ``torch.nonzero`` of a lower-triangular adjacency). No conformer, no charges."""
    from rdkit import Chem

    types = (None, Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE)
    mol = Chem.RWMol()
    for z in numbers.tolist():
        mol.AddAtom(Chem.Atom(int(z)))
    ii, jj = np.nonzero(np.tril(orders, -1))
    for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
        mol.AddBond(i, j, types[int(orders[i, j])])
    return mol


def to_rdkit(mol: Molecule, sanitize: bool = False) -> Chem.Mol:
    """RDKit molecule with EDM's bonds (``bond_orders``) and a 3D conformer (Angstrom).

    Mirrors EDM's ``build_molecule`` (Hoogeboom et al. 2022): no formal charges (``mol.charges`` is
    ignored), no hydrogens added. With ``sanitize`` RDKit's ``SanitizeMol`` runs and its error
    (e.g. a hypervalent atom) propagates as ``ValueError`` naming the molecule.

    Args:
        mol: ``numbers [N]``, ``positions [N, 3]``.
        sanitize: run ``Chem.SanitizeMol`` on the result.

    Returns:
        an ``rdkit.Chem.Mol`` with ``N`` atoms and one conformer.
    """
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    rw = edm_rwmol(mol.numbers, bond_orders(mol.numbers, mol.positions))
    conf = Chem.Conformer(len(mol))
    for i, (x, y, z) in enumerate(mol.positions.tolist()):
        conf.SetAtomPosition(i, Point3D(x, y, z))
    conf.Set3D(True)
    rw.AddConformer(conf, assignId=True)
    out = rw.GetMol()
    if mol.name:
        out.SetProp("_Name", mol.name)
    if sanitize:
        try:
            Chem.SanitizeMol(out)
        except ValueError as e:  # RDKit's sanitize exceptions derive from ValueError
            raise ValueError(f"molecule {mol.name!r}: RDKit sanitize failed: {e}") from e
    return out
