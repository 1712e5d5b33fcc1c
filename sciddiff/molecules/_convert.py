"""Molecules <-> the engine's ``State`` (and RDKit / ASE), the atom-count prior and the noise prior.

The layout follows EDM (Hoogeboom et al. 2022, "Equivariant Diffusion for Molecule Generation in
3D", Sec. 3): positions ``x`` in the zero centre-of-mass subspace (unweighted mean, Sec. 3.2),
atom types as continuous one-hot features ``h`` diffused by the same Gaussian process, and the
molecule size drawn first from the training-set histogram ``p(M)`` (Sec. 3.4). RDKit and ASE are
imported lazily, inside the functions that need them, so importing this module pulls in neither.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..core import GaussianProcess, State, ZeroCoM
from ._elements import symbol_of
from ._types import ATOM_SYMBOLS, ATOMIC_NUMBERS, Molecule

if TYPE_CHECKING:  # pragma: no cover
    import ase
    from rdkit import Chem

_MAX_Z = 36  # the last element of ``_elements`` (Kr)

#: atomic number -> index into ``ATOM_SYMBOLS`` (-1: not a QM9 element).
_TYPE_OF_Z = np.full(_MAX_Z + 1, -1, dtype=np.int64)
_TYPE_OF_Z[list(ATOMIC_NUMBERS)] = np.arange(len(ATOMIC_NUMBERS))


# ------------------------------------------------------------------------------------------------
# RDKit and ASE
def from_rdkit(mol: Chem.Mol, conf_id: int = -1) -> Molecule:
    """An RDKit molecule with a 3D conformer -> ``Molecule`` (``numbers [N]``, ``positions [N, 3]``
    Angstrom, formal ``charges [N]``, title as ``name``, non-private props as ``properties``).

    Raises ``ValueError`` for a molecule without a 3D conformer, or with a dummy atom or an element
    beyond Kr.
    """
    from rdkit import Chem

    if not isinstance(mol, Chem.Mol):
        raise TypeError(f"from_rdkit: expected an rdkit Chem.Mol, got {type(mol).__name__}")
    name = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
    label = f"molecule {name!r}" if name else "molecule"
    if mol.GetNumConformers() == 0:
        raise ValueError(f"{label} has no conformer (no 3D coordinates); embed one first")
    conf = mol.GetConformer(conf_id)
    if not conf.Is3D():
        raise ValueError(f"{label} has only 2D coordinates; a 3D conformer is needed")
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    bad = np.flatnonzero((numbers < 1) | (numbers > _MAX_Z))
    if bad.size:
        a = mol.GetAtomWithIdx(int(bad[0]))
        raise ValueError(
            f"{label}: atom {int(bad[0])} is {a.GetSymbol()!r} (Z={a.GetAtomicNum()}); "
            f"only real elements H..Kr (Z 1..{_MAX_Z}) are supported"
        )
    charges = np.array([a.GetFormalCharge() for a in mol.GetAtoms()], dtype=np.int64)
    props = mol.GetPropsAsDict(includePrivate=False, includeComputed=False)
    return Molecule(numbers, conf.GetPositions(), charges=charges, name=name, properties=dict(props))


def to_ase(mol: Molecule) -> ase.Atoms:
    """``Molecule`` -> ``ase.Atoms`` (no cell, no periodicity); formal charges become ASE's
    ``initial_charges``, the name and properties go to ``atoms.info``."""
    import ase

    atoms = ase.Atoms(numbers=mol.numbers, positions=mol.positions)
    if mol.charges is not None:
        atoms.set_initial_charges(mol.charges.astype(np.float64))
    atoms.info.update(mol.properties)
    if mol.name:
        atoms.info["name"] = mol.name
    return atoms


def from_ase(atoms: ase.Atoms) -> Molecule:
    """``ase.Atoms`` (non-periodic) -> ``Molecule``; integer ``initial_charges`` become formal
    charges, ``atoms.info["name"]`` the name, the rest of ``atoms.info`` the properties."""
    import ase

    if not isinstance(atoms, ase.Atoms):
        raise TypeError(f"from_ase: expected ase.Atoms, got {type(atoms).__name__}")
    if atoms.pbc.any():
        raise ValueError(f"from_ase: {atoms.get_chemical_formula()} is periodic (pbc={atoms.pbc.tolist()})")
    charges = None
    if atoms.has("initial_charges"):
        q = atoms.get_initial_charges()
        if not np.allclose(q, np.round(q)):
            raise ValueError("from_ase: initial_charges are not integers; formal charges are expected")
        charges = np.round(q).astype(np.int64)
    bad = np.flatnonzero((atoms.numbers < 1) | (atoms.numbers > _MAX_Z))
    if bad.size:
        raise ValueError(
            f"from_ase: atom {int(bad[0])} has Z={int(atoms.numbers[bad[0]])}; only H..Kr (Z 1..{_MAX_Z}) "
            "are supported"
        )
    info = dict(atoms.info)
    name = str(info.pop("name", ""))
    return Molecule(atoms.numbers.copy(), atoms.positions.copy(), charges=charges, name=name, properties=info)


# ------------------------------------------------------------------------------------------------
# State
def molecules_to_state(
    mols: Molecule | Sequence[Molecule], dtype: torch.dtype = torch.float32, charges: bool = False
) -> State:
    """Stack molecules into a flat ``State`` (EDM's representation, Hoogeboom et al. 2022, Sec. 3).

    Fields (``N`` = total atoms, ``B`` = ``len(mols)``):
        ``"pos" [N, 3]``: Angstrom, each molecule's centroid (unweighted centre of mass) moved to the
            origin; constraint ``ZeroCoM()``.
        ``"h" [N, 5]``: one-hot atom type over ``ATOM_SYMBOLS`` (H, C, N, O, F), raw 0/1 values.
        ``"charge" [N, 1]`` (only with ``charges=True``): formal charges (0 where a molecule has none).
    All fields share one batch index tensor ``[N]`` (molecule of each atom, in input order).

    Raises ``ValueError`` naming the molecule index for an element outside H, C, N, O, F or a
    molecule without atoms.
    """
    if isinstance(mols, Molecule):
        mols = [mols]
    if not dtype.is_floating_point:
        raise TypeError(f"molecules_to_state: dtype must be a floating type, got {dtype}")
    if len(mols) == 0:
        raise ValueError("molecules_to_state: no molecules")
    types, pos, chg = [], [], []
    for i, mol in enumerate(mols):
        if not isinstance(mol, Molecule):
            raise TypeError(f"molecules_to_state: item {i} is a {type(mol).__name__}, expected Molecule")
        types.append(_type_indices(mol, i))
        pos.append(mol.positions - mol.positions.mean(axis=0))  # centred in float64, then cast
        chg.append(mol.charges if mol.charges is not None else np.zeros(len(mol), dtype=np.int64))
    sizes = torch.tensor([len(m) for m in mols])
    batch = torch.repeat_interleave(torch.arange(len(mols)), sizes)
    h = torch.nn.functional.one_hot(torch.from_numpy(np.concatenate(types)), len(ATOM_SYMBOLS))
    data = {"pos": torch.from_numpy(np.concatenate(pos)).to(dtype), "h": h.to(dtype)}
    if charges:
        data["charge"] = torch.from_numpy(np.concatenate(chg)).to(dtype).unsqueeze(1)
    return State(
        data, batch={k: batch for k in data}, num_systems=len(mols), constraints={"pos": ZeroCoM()}
    )


def _type_indices(mol: Molecule, i: int) -> np.ndarray:
    """Indices into ``ATOM_SYMBOLS`` ``[N]``; ``ValueError`` naming molecule ``i`` otherwise."""
    label = f"molecule {i}" + (f" ({mol.name!r})" if mol.name else "")
    if len(mol) == 0:
        raise ValueError(f"molecules_to_state: {label} has no atoms")
    z = mol.numbers
    idx = np.where((z >= 1) & (z <= _MAX_Z), _TYPE_OF_Z[np.clip(z, 0, _MAX_Z)], -1)
    bad = np.flatnonzero(idx < 0)
    if bad.size:
        zb = int(z[bad[0]])
        sym = symbol_of(zb) if 1 <= zb <= _MAX_Z else f"Z={zb}"
        raise ValueError(
            f"molecules_to_state: {label}: element {sym} (atom {int(bad[0])}) is not one of "
            f"{', '.join(ATOM_SYMBOLS)}"
        )
    return idx


def state_to_molecules(state: State, scale_h: float = 1.0, scale_charge: float = 1.0) -> list[Molecule]:
    """Decode a flat molecule ``State`` (``"pos" [N, 3]``, ``"h" [N, 5]``, optional ``"charge" [N, 1]``)
    into ``state.num_systems`` molecules: type = argmax of ``h / scale_h`` over H, C, N, O, F (EDM's
    decoding, Hoogeboom et al. 2022, Sec. 3.3), positions in Angstrom as given, formal charges =
    ``round(charge / scale_charge)``. ``scale_h`` undoes a model's feature scaling (EDM: 0.25).

    Raises ``ValueError`` for a missing or non-flat field, or non-finite positions (naming the system).
    """
    for name, val in (("scale_h", scale_h), ("scale_charge", scale_charge)):
        if not (math.isfinite(val) and val > 0):
            raise ValueError(f"state_to_molecules: {name} must be a positive number, got {val}")
    for k in ("pos", "h"):
        if k not in state.keys() or k not in state.batch:
            raise ValueError(f"state_to_molecules: the state needs a flat field {k!r}; got {state!r}")
    batch = state.batch["pos"]
    if not torch.equal(state.batch["h"], batch):
        raise ValueError("state_to_molecules: 'pos' and 'h' have different batch indices")
    if state["pos"].shape[1:] != (3,) or state["h"].shape[1:] != (len(ATOM_SYMBOLS),):
        raise ValueError(
            f"state_to_molecules: expected pos [N, 3] and h [N, {len(ATOM_SYMBOLS)}]; got {state!r}"
        )
    order = torch.argsort(batch, stable=True).cpu()
    sizes = torch.bincount(batch, minlength=state.num_systems).cpu().tolist()
    pos = state["pos"].detach().cpu().double()[order].numpy()
    types = (state["h"].detach().cpu().double()[order] / scale_h).argmax(dim=1).numpy()
    numbers = np.asarray(ATOMIC_NUMBERS, dtype=np.int64)[types]
    chg = None
    if "charge" in state.keys():
        chg = torch.round(state["charge"].detach().cpu().double()[order].reshape(-1) / scale_charge)
        chg = chg.long().numpy()
    out, start = [], 0
    for b, n in enumerate(sizes):
        sl = slice(start, start + n)
        start += n
        if not np.isfinite(pos[sl]).all():
            raise ValueError(f"state_to_molecules: system {b} has non-finite positions (NaN or Inf)")
        out.append(Molecule(numbers[sl], pos[sl], charges=None if chg is None else chg[sl]))
    return out


# ------------------------------------------------------------------------------------------------
# priors
class NumAtomsDistribution:
    """Empirical distribution of molecule sizes ``p(M)`` (EDM, Hoogeboom et al. 2022, Sec. 3.4).

    Args:
        counts: the atom count of every training molecule (e.g. ``[9, 18, 18, 27]``), each >= 1.
    """

    def __init__(self, counts: Iterable[int] | Tensor | np.ndarray) -> None:
        arr = np.asarray(counts.cpu() if isinstance(counts, Tensor) else list(counts))
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("NumAtomsDistribution: need a non-empty 1-D list of atom counts")
        if not np.issubdtype(arr.dtype, np.integer):
            if not (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))):
                raise ValueError(f"NumAtomsDistribution: atom counts must be integers, got {arr.dtype}")
            arr = arr.astype(np.int64)
        if arr.min() < 1:
            raise ValueError(f"NumAtomsDistribution: atom counts must be >= 1, got {int(arr.min())}")
        sizes, freq = np.unique(arr.astype(np.int64), return_counts=True)
        self._set(sizes, freq)

    def _set(self, sizes: np.ndarray, freq: np.ndarray) -> None:
        self.sizes = torch.from_numpy(sizes.astype(np.int64))  # [K] distinct sizes, ascending
        self.frequencies = torch.from_numpy(freq.astype(np.int64))  # [K] occurrences of each
        self.probs = self.frequencies.double() / self.frequencies.sum()  # [K]

    @classmethod
    def from_histogram(cls, histogram: Mapping[int, int]) -> NumAtomsDistribution:
        """From ``{size: occurrences}`` (sizes >= 1, occurrences >= 0, not all zero)."""
        items = sorted((int(k), int(v)) for k, v in histogram.items() if int(v) > 0)
        if not items or items[0][0] < 1 or any(int(v) < 0 for v in histogram.values()):
            raise ValueError(
                "NumAtomsDistribution: a histogram needs sizes >= 1, non-negative occurrences, "
                f"and at least one positive occurrence; got {dict(histogram)}"
            )
        new = object.__new__(cls)
        new._set(np.array([k for k, _ in items]), np.array([v for _, v in items]))
        return new

    @property
    def max_atoms(self) -> int:
        return int(self.sizes[-1])

    @property
    def mean(self) -> float:
        return float((self.sizes.double() * self.probs).sum())

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` molecule sizes ``[n]`` (long), drawn i.i.d. from the histogram."""
        if n < 0:
            raise ValueError(f"NumAtomsDistribution.sample: n must be >= 0, got {n}")
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        idx = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        return self.sizes[idx]

    def log_prob(self, num_atoms: Tensor) -> Tensor:
        """``log p(M)`` for sizes ``[B]`` (``-inf`` where never seen); float64 ``[B]``."""
        table = torch.full((self.max_atoms + 1,), -math.inf, dtype=torch.float64)
        table[self.sizes] = self.probs.log()
        n = num_atoms.detach().cpu().long()
        inside = (n >= 0) & (n <= self.max_atoms)
        return torch.where(inside, table[n.clamp(0, self.max_atoms)], table.new_tensor(-math.inf))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"sizes": [...], "frequencies": [...]}``."""
        return {"sizes": self.sizes.tolist(), "frequencies": self.frequencies.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NumAtomsDistribution:
        """Inverse of ``to_dict``; clear errors for missing keys or mismatched lengths."""
        if not isinstance(d, Mapping) or set(d) != {"sizes", "frequencies"}:
            got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(
                f"NumAtomsDistribution.from_dict: expected keys ['frequencies', 'sizes'], got {got}"
            )
        sizes, freq = list(d["sizes"]), list(d["frequencies"])
        if len(sizes) != len(freq) or len(set(sizes)) != len(sizes):
            raise ValueError(
                "NumAtomsDistribution.from_dict: 'sizes' must be distinct and as many as 'frequencies'"
            )
        return cls.from_histogram(dict(zip(sizes, freq, strict=True)))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, NumAtomsDistribution)
            and torch.equal(self.sizes, other.sizes)
            and torch.equal(self.frequencies, other.frequencies)
        )

    def __repr__(self) -> str:
        k, lo = len(self.sizes), int(self.sizes[0])
        return f"NumAtomsDistribution({k} sizes in [{lo}, {self.max_atoms}], mean {self.mean:.2f})"


def prior_state(
    num_atoms: Tensor,
    process: GaussianProcess,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    charges: bool = False,
    device: torch.device | str | None = None,
) -> State:
    """A draw of ``x_{t_max}`` for a batch of molecules with ``num_atoms [B]`` atoms each.

    Same layout as ``molecules_to_state``: ``"pos" [N, 3]`` from the zero-CoM Gaussian
    (Hoogeboom et al. 2022, Sec. 3.2), ``"h" [N, 5]`` (and ``"charge" [N, 1]`` with ``charges``)
    from a plain Gaussian, all with the process's prior scale (``process.prior``); ``N = sum(num_atoms)``.
    """
    integer = isinstance(num_atoms, Tensor) and num_atoms.dtype in (torch.int64, torch.int32)
    if not integer or num_atoms.ndim != 1:
        raise ValueError("prior_state: num_atoms must be a 1-D integer tensor [B]")
    if num_atoms.numel() == 0 or int(num_atoms.min()) < 1:
        raise ValueError("prior_state: need at least one molecule, each with >= 1 atom")
    if not dtype.is_floating_point:
        raise TypeError(f"prior_state: dtype must be a floating type, got {dtype}")
    sizes = num_atoms.long().to(device)
    b = sizes.shape[0]
    batch = torch.repeat_interleave(torch.arange(b, device=sizes.device), sizes)
    n = batch.shape[0]
    data = {
        "pos": torch.zeros(n, 3, dtype=dtype, device=sizes.device),
        "h": torch.zeros(n, len(ATOM_SYMBOLS), dtype=dtype, device=sizes.device),
    }
    if charges:
        data["charge"] = torch.zeros(n, 1, dtype=dtype, device=sizes.device)
    template = State(data, batch={k: batch for k in data}, num_systems=b, constraints={"pos": ZeroCoM()})
    return process.prior(template, generator)
