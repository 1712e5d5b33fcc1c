"""EDM's molecule metrics (stability, RDKit validity, uniqueness, novelty) and MMFF94 relaxation.

Faithful port of ``qm9/analyze.py`` (``check_stability``, ``analyze_stability_for_molecules``) and
``qm9/rdkit_functions.py`` (``BasicMolecularMetrics``) of Hoogeboom et al. 2022, "Equivariant
Diffusion for Molecule Generation in 3D" (ICML), Table 1:

- atom stability: fraction of all atoms whose total EDM bond order is an allowed valence;
- molecule stability: fraction of molecules whose atoms are all stable;
- validity: fraction of molecules whose EDM-built RDKit molecule (no charges, explicit H atoms)
  passes ``Chem.SanitizeMol``; its SMILES is that of the largest fragment (most atoms, first wins);
- uniqueness: distinct valid SMILES / valid; ``valid_unique`` = distinct valid SMILES / n;
- novelty: distinct valid SMILES not in the training SMILES / distinct valid SMILES.

Novelty compares canonical heavy-atom SMILES without stereo (``novelty_key``) on both sides, so
training SMILES in any RDKit-readable form (QM9's, or EDM's explicit-H ones) give EDM's answer:
EDM compared explicit-H SMILES of the same pipeline, which are equal exactly when these keys are.

Beyond EDM, ``relax`` runs RDKit MMFF94 (Halgren 1996, J. Comput. Chem. 17, 490) from each valid
molecule's generated geometry and reports how far it is from a force-field minimum.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._bonds import (
    _check_known,
    _missing_pair,
    _orders_from_distances,
    atom_stable,
    edm_rwmol,
    pairwise_distances_pm,
)
from ._types import Molecule

if TYPE_CHECKING:  # pragma: no cover
    from rdkit import Chem

_CHUNK = 1024  # molecules per padded batch: [chunk, P, P] float64 stays a few MB for QM9 sizes
_RELAX_SEED = 0


@dataclass
class MoleculeMetrics:
    """EDM Table 1 metrics of ``n`` molecules (fractions in [0, 1]) and optional MMFF94 relaxation.

    ``novelty`` is None without training SMILES. ``relax_*`` are None unless ``relax`` was asked:
    ``relax_n`` valid molecules were tried, ``relax_success`` is the fraction whose MMFF94 setup
    and optimisation converged, ``relax_energy_drop`` the median E(generated) - E(relaxed) in
    kcal/mol, ``relax_rmsd`` the median heavy-atom RMSD (Angstrom, after optimal superposition)
    between generated and relaxed geometry, both over the converged ones.
    ``smiles`` (one per input, None where invalid) and ``stable [n]`` are per molecule.
    """

    n: int
    atom_stability: float
    molecule_stability: float
    validity: float
    uniqueness: float
    valid_unique: float
    novelty: float | None = None
    relax_n: int | None = None
    relax_success: float | None = None
    relax_energy_drop: float | None = None
    relax_rmsd: float | None = None
    smiles: list[str | None] = field(default_factory=list, repr=False)
    stable: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the scalar fields above (no per-molecule lists)."""
        keys = ("n", "atom_stability", "molecule_stability", "validity", "uniqueness", "valid_unique",
                "novelty", "relax_n", "relax_success", "relax_energy_drop", "relax_rmsd")
        return {k: getattr(self, k) for k in keys}


# ------------------------------------------------------------------------------------------------
# stability
def _padded_orders(mols: Sequence[Molecule]) -> list[np.ndarray]:
    """EDM bond orders per molecule (``[N_k, N_k]``), computed in padded chunks for speed."""
    out: list[np.ndarray] = []
    for start in range(0, len(mols), _CHUNK):
        chunk = mols[start : start + _CHUNK]
        p = max((len(m) for m in chunk), default=0)
        numbers = np.ones((len(chunk), p), dtype=np.int64)  # padding: H, masked out below
        pos = np.zeros((len(chunk), p, 3))
        for k, m in enumerate(chunk):
            numbers[k, : len(m)] = m.numbers
            pos[k, : len(m)] = m.positions
        orders = _orders_from_distances(numbers, pairwise_distances_pm(pos))
        out.extend(orders[k, : len(m), : len(m)] for k, m in enumerate(chunk))
    return out


def _check_molecules(mols: Sequence[Molecule]) -> None:
    for k, m in enumerate(mols):
        if not isinstance(m, Molecule):
            raise TypeError(f"molecule {k}: expected sciddiff Molecule, got {type(m).__name__}")
        what = f"molecule {k} ({m.name!r})" if m.name else f"molecule {k}"
        _check_known(m.numbers, what)
        pair = _missing_pair(m.numbers)
        if pair is not None:  # EDM's QM9 metrics raise KeyError here
            raise ValueError(f"{what}: no EDM single-bond length for the pair {pair[0]}-{pair[1]}")


# ------------------------------------------------------------------------------------------------
# RDKit validity
def _mol2smiles(mol: Chem.Mol) -> str | None:
    """EDM's ``mol2smiles``: sanitize in place, then canonical SMILES; None if sanitize fails."""
    from rdkit import Chem

    try:
        Chem.SanitizeMol(mol)
    except ValueError:
        return None
    return Chem.MolToSmiles(mol)


def _edm_validity(numbers: np.ndarray, orders: np.ndarray) -> tuple[str | None, Chem.Mol]:
    """EDM validity of one molecule: the largest fragment's SMILES (None if invalid) and the
    sanitized full molecule (``BasicMolecularMetrics.compute_validity``, Hoogeboom et al. 2022)."""
    from rdkit import Chem

    mol = edm_rwmol(numbers, orders)
    whole = _mol2smiles(mol)
    if whole is None:
        return None, mol
    if len(Chem.GetMolFrags(mol)) == 1:  # EDM re-sanitizes a copy; sanitizing is idempotent
        return whole, mol
    frags = Chem.GetMolFrags(mol, asMols=True)
    largest = max(frags, default=mol, key=lambda m: m.GetNumAtoms())
    smi = _mol2smiles(largest)
    # EDM appends whatever this returns; an unsanitizable fragment of a sanitized molecule does not
    # occur in practice, but keep it counted as valid under a non-SMILES key as EDM would.
    return ("<unsanitizable fragment>" if smi is None else smi), mol


def novelty_key(smiles: str) -> str | None:
    """Canonical SMILES without hydrogens or stereo (RDKit), the key compared for novelty; None
    when RDKit cannot parse ``smiles``."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    return None if mol is None else Chem.MolToSmiles(mol, isomericSmiles=False)


_KEY_CACHE: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {}


def _reference_keys(train_smiles: Collection[str]) -> frozenset[str]:
    """``novelty_key`` of every training SMILES, cached for the last reference (canonicalising
    QM9's 100k SMILES takes seconds)."""
    ref = tuple(train_smiles)
    hit = _KEY_CACHE.get("last")
    if hit is not None and hit[0] == ref:
        return hit[1]
    keys = frozenset(k for k in map(novelty_key, ref) if k is not None)
    _KEY_CACHE["last"] = (ref, keys)
    return keys


# ------------------------------------------------------------------------------------------------
# MMFF94 relaxation
def kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """RMSD of ``a [N, 3]`` and ``b [N, 3]`` after optimal rigid superposition (Kabsch 1976, Acta
    Cryst. A32, 922: SVD of the covariance of the centred sets, with a reflection fix)."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    u, s, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    s[-1] *= d  # a reflection would lower the RMSD below that of any rotation
    msd = max((a * a).sum() + (b * b).sum() - 2.0 * s.sum(), 0.0) / len(a)
    return math.sqrt(msd)


@dataclass
class _Relaxed:
    converged: bool
    energy_drop: float = math.nan  # kcal/mol
    rmsd: float = math.nan  # Angstrom, heavy atoms


def _relax_one(mol: Chem.Mol, positions: np.ndarray, max_iters: int) -> _Relaxed:
    """MMFF94 minimisation from the generated geometry; implicit H (atoms RDKit filled up during
    sanitize) are made explicit with coordinates so the force field sees a closed-shell molecule."""
    from rdkit import Chem
    from rdkit.Chem import AllChem
    from rdkit.Geometry import Point3D

    conf = Chem.Conformer(mol.GetNumAtoms())
    for i, (x, y, z) in enumerate(positions.tolist()):
        conf.SetAtomPosition(i, Point3D(x, y, z))
    mol = Chem.Mol(mol)
    mol.RemoveAllConformers()
    mol.AddConformer(conf, assignId=True)
    mol = Chem.AddHs(mol, addCoords=True)
    props = AllChem.MMFFGetMoleculeProperties(mol, mmffVariant="MMFF94")
    if props is None:
        return _Relaxed(False)
    ff = AllChem.MMFFGetMoleculeForceField(mol, props)
    if ff is None:
        return _Relaxed(False)
    e0 = ff.CalcEnergy()
    if ff.Minimize(maxIts=max_iters) != 0:
        return _Relaxed(False)
    # AddHs appends, so the generated atoms keep their indices
    heavy = [i for i in range(len(positions)) if mol.GetAtomWithIdx(i).GetAtomicNum() > 1]
    after = np.asarray(ff.Positions()).reshape(-1, 3)[heavy]
    rmsd = kabsch_rmsd(positions[heavy], after) if heavy else 0.0
    return _Relaxed(True, e0 - ff.CalcEnergy(), rmsd)


def _median(xs: list[float]) -> float | None:
    return float(np.median(xs)) if xs else None


def _relaxation(
    mols: Sequence[Molecule], sanitized: list[Chem.Mol | None], relax: bool | int, max_iters: int
) -> dict[str, Any]:
    valid = [k for k, m in enumerate(sanitized) if m is not None]
    if relax is not True and int(relax) < len(valid):
        rng = np.random.default_rng(_RELAX_SEED)
        valid = sorted(rng.choice(valid, size=int(relax), replace=False).tolist())
    results = [_relax_one(sanitized[k], mols[k].positions, max_iters) for k in valid]
    ok = [r for r in results if r.converged]
    return {
        "relax_n": len(valid),
        "relax_success": len(ok) / len(valid) if valid else 0.0,
        "relax_energy_drop": _median([r.energy_drop for r in ok]),
        "relax_rmsd": _median([r.rmsd for r in ok]),
    }


# ------------------------------------------------------------------------------------------------
def evaluate_molecules(
    mols: Sequence[Molecule],
    train_smiles: Collection[str] | None = None,
    relax: bool | int = False,
    relax_max_iters: int = 2000,
) -> MoleculeMetrics:
    """EDM's Table 1 metrics (Hoogeboom et al. 2022), optionally with MMFF94 relaxation.

    Args:
        mols: ``n`` molecules, each ``numbers [N_k]`` (H, B, C, N, O, F, Al, Si, P, S, Cl, As, Br,
            I, Hg, Bi: elements EDM knows), ``positions [N_k, 3]`` Angstrom. Charges are ignored.
        train_smiles: training-set SMILES (any RDKit-readable form) for novelty; None: no novelty.
        relax: False; True to relax every valid molecule; an int ``k`` to relax a seeded random
            subsample of ``k`` valid molecules (MMFF is ~10-50 ms per QM9 molecule).
        relax_max_iters: MMFF minimiser iterations; not converging counts as failure.

    Returns:
        ``MoleculeMetrics``. Atom stability is over all atoms (EDM's micro average). With no valid
        molecule, uniqueness and novelty are 0 (as in EDM).

    Raises:
        ValueError: no molecules, an element without EDM bond lengths (naming the molecule), or a
            pair of elements without an EDM single-bond length.
    """
    if len(mols) == 0:
        raise ValueError("evaluate_molecules: no molecules given")
    if isinstance(relax, bool):
        pass
    elif not isinstance(relax, int) or relax < 1:
        raise ValueError(f"relax must be a bool or a positive int, got {relax!r}")
    _check_molecules(mols)
    from rdkit.rdBase import BlockLogs

    _quiet = BlockLogs()  # RDKit logs every failed sanitize to stderr; silenced while this lives
    orders = _padded_orders(mols)
    stable = [atom_stable(m.numbers, o) for m, o in zip(mols, orders, strict=True)]
    n_atoms = sum(len(s) for s in stable)
    smiles: list[str | None] = []
    sanitized: list[Chem.Mol | None] = []
    for m, o in zip(mols, orders, strict=True):
        smi, rd = _edm_validity(m.numbers, o)
        smiles.append(smi)
        sanitized.append(rd if smi is not None else None)
    valid = [s for s in smiles if s is not None]
    unique = set(valid)
    novelty = None
    if train_smiles is not None:
        ref = _reference_keys(train_smiles)
        keys = [novelty_key(s) for s in unique]
        novelty = sum(k not in ref for k in keys) / len(unique) if unique else 0.0
    out = MoleculeMetrics(
        n=len(mols),
        atom_stability=sum(int(s.sum()) for s in stable) / n_atoms if n_atoms else 0.0,
        molecule_stability=sum(bool(s.all()) for s in stable) / len(mols),
        validity=len(valid) / len(mols),
        uniqueness=len(unique) / len(valid) if valid else 0.0,
        valid_unique=len(unique) / len(mols),
        novelty=novelty,
        smiles=smiles,
        stable=np.array([bool(s.all()) for s in stable]),
    )
    if relax is not False:
        for k, v in _relaxation(mols, sanitized, relax, relax_max_iters).items():
            setattr(out, k, v)
    del _quiet
    return out
