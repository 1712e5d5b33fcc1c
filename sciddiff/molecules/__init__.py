"""Molecule adapter (QM9): I/O, EDM-faithful metrics, E(n)/SE(3)-equivariant backbones, training and
generation on the domain-free engine.

Needs ``pip install "sciddiff[molecules]"`` (rdkit, ase, e3nn, qm9pack). Typical use::

    from sciddiff.molecules import generate, evaluate_molecules, read_molecules
    mols = generate(n=100)                       # RDKit Mols with 3D conformers (bundled model)
    metrics = evaluate_molecules(read_molecules("out.sdf"))

Representation (EDM, Hoogeboom et al. 2022): positions in Angstrom in the zero centre-of-mass
subspace, atom types H, C, N, O, F as continuous one-hot features diffused by the same Gaussian
process (so every engine sampler applies unchanged), molecule sizes drawn from the training histogram.
"""

from ._bonds import ALLOWED_BONDS, bond_orders, get_bond_order, to_rdkit
from ._convert import (
    NumAtomsDistribution,
    from_ase,
    from_rdkit,
    molecules_to_state,
    prior_state,
    state_to_molecules,
    to_ase,
)
from ._egnn import EGNNDenoiser
from ._generate import MoleculeGenerator, export_generator, generate, load_generator, sample_molecules
from ._io import (
    MoleculeFileError,
    read_molecules,
    read_sdf,
    read_xyz,
    write_molecules,
    write_sdf,
    write_xyz,
)
from ._metrics import MoleculeMetrics, evaluate_molecules
from ._plot import plot_molecules
from ._qm9 import QM9Split, load_qm9, load_qm9_edm_smiles, load_train_smiles
from ._types import ATOM_SYMBOLS, ATOMIC_NUMBERS, Molecule

__all__ = [
    "ALLOWED_BONDS", "bond_orders", "get_bond_order", "to_rdkit",
    "NumAtomsDistribution", "from_ase", "from_rdkit", "molecules_to_state", "prior_state",
    "state_to_molecules", "to_ase", "EGNNDenoiser",
    "MoleculeGenerator", "export_generator", "generate", "load_generator", "sample_molecules",
    "MoleculeFileError", "read_molecules", "read_sdf", "read_xyz", "write_molecules", "write_sdf",
    "write_xyz",
    "MoleculeMetrics", "evaluate_molecules", "plot_molecules",
    "QM9Split", "load_qm9", "load_qm9_edm_smiles", "load_train_smiles",
    "ConfigError", "MoleculeTrainConfig", "PolynomialVP", "QM9Dataset", "train_molecules",
    "ATOM_SYMBOLS", "ATOMIC_NUMBERS", "Molecule",
]


_LAZY = {  # imported on first use: e3nn and pytorch-lightning take seconds to import
    "E3Denoiser": "._e3nn", "ConfigError": "._config", "MoleculeTrainConfig": "._config",
    "PolynomialVP": "._train", "QM9Dataset": "._train", "train_molecules": "._train",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'sciddiff.molecules' has no attribute {name!r}")
