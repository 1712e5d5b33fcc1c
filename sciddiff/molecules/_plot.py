"""A picture of generated molecules: 2D depictions (RDKit) of many, 3D views (matplotlib) of a few."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._io import _atomic_write
from ._types import Molecule

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from rdkit import Chem

#: CPK-like element colours (Corey & Pauling 1953; Koltun 1965), as in Jmol.
_COLOURS = {1: "#e8e8e8", 6: "#404040", 7: "#3050f8", 8: "#ff0d0d", 9: "#90e050"}
_OTHER_COLOUR = "#ff1493"
_SIZES = {1: 40.0}  # scatter marker area; heavy atoms get the default
_HEAVY_SIZE = 110.0
_COLUMNS = 6


def plot_molecules(mols: Sequence[Molecule | Chem.Mol], path: str | os.PathLike, n2d: int = 24,
                   n3d: int = 4, *, dpi: int = 100) -> Path:
    """Draw ``mols`` into one PNG at ``path`` (written atomically): a grid of 2D depictions of the
    first ``n2d`` (RDKit, hydrogens hidden, captioned with the formula) and 3D views of the first
    ``n3d`` (atoms coloured by element, bonds as lines). ``mols`` are ``Molecule`` objects (bonds
    from EDM's distance rules, ``to_rdkit``) or RDKit Mols with a conformer. Returns the path."""
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot_molecules: {path}: the output is a PNG image; name it *.png")
    if n2d < 0 or n3d < 0 or n2d + n3d == 0:
        raise ValueError(f"plot_molecules: need n2d >= 0, n3d >= 0 and not both 0, got {n2d}, {n3d}")
    rd = [_as_rdkit(m, i) for i, m in enumerate(mols)]
    if not rd:
        raise ValueError("plot_molecules: no molecules to draw")
    flat, views = rd[:n2d], rd[:n3d]
    rows2d = math.ceil(len(flat) / _COLUMNS)
    cols3d = min(len(views), _COLUMNS)
    rows3d = math.ceil(len(views) / _COLUMNS) if views else 0
    heights = [r for r in (rows2d, 1.5 * rows3d) if r]
    fig = Figure(figsize=(2.2 * _COLUMNS, 2.2 * sum(heights)), dpi=dpi)
    outer = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    if flat:
        grid = outer[0].subgridspec(rows2d, _COLUMNS)
        for k in range(rows2d * _COLUMNS):
            ax = fig.add_subplot(grid[k // _COLUMNS, k % _COLUMNS])
            ax.set_axis_off()
            if k < len(flat):
                _draw_2d(ax, flat[k], k)
    if views:
        grid = outer[-1].subgridspec(rows3d, cols3d)
        for k, mol in enumerate(views):
            _draw_3d(fig.add_subplot(grid[k // cols3d, k % cols3d], projection="3d"), mol, k)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return path


def _as_rdkit(mol: Any, i: int) -> Chem.Mol:
    """An RDKit copy with a conformer and computed valences (sanitized where RDKit accepts it)."""
    from rdkit import Chem, rdBase

    if isinstance(mol, Molecule):
        from ._bonds import to_rdkit

        rd = to_rdkit(mol, sanitize=False)
    elif isinstance(mol, Chem.Mol):
        if mol.GetNumConformers() == 0:
            raise ValueError(f"plot_molecules: molecule {i} (RDKit Mol) has no conformer")
        rd = Chem.Mol(mol)
    else:
        raise TypeError(f"plot_molecules: item {i} is a {type(mol).__name__}, expected Molecule or rdkit Mol")
    with rdBase.BlockLogs():  # unsanitizable molecules are drawn as they are
        if Chem.SanitizeMol(rd, catchErrors=True) != Chem.SanitizeFlags.SANITIZE_NONE:
            rd.UpdatePropertyCache(strict=False)
            Chem.FastFindRings(rd)
    return rd


def _draw_2d(ax: Axes, mol: Chem.Mol, k: int, size: int = 220) -> None:
    """RDKit 2D depiction (hydrogens hidden, new 2D coordinates) as an image in ``ax``."""
    from matplotlib.image import imread
    from rdkit import Chem, rdBase
    from rdkit.Chem import rdDepictor
    from rdkit.Chem.Draw import rdMolDraw2D
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    with rdBase.BlockLogs():
        heavy = Chem.RWMol(mol)
        for atom in heavy.GetAtoms():  # keep hydrogen counts exact: the hidden Hs become labels (OH)
            atom.SetNoImplicit(True)
        flat = Chem.RemoveHs(heavy, sanitize=False)
        flat.UpdatePropertyCache(strict=False)
        rdDepictor.Compute2DCoords(flat)
        drawer = rdMolDraw2D.MolDraw2DCairo(size, size)
        try:
            rdMolDraw2D.PrepareAndDrawMolecule(drawer, flat, kekulize=False)
        except (RuntimeError, ValueError):  # a molecule RDKit cannot prepare: draw it raw
            drawer.DrawMolecule(flat)
        drawer.FinishDrawing()
        formula = CalcMolFormula(mol)
    ax.imshow(imread(io.BytesIO(drawer.GetDrawingText()), format="png"))
    ax.set_title(f"{k}: {formula}", fontsize=8)


def _draw_3d(ax: Any, mol: Chem.Mol, k: int) -> None:
    """Atoms as spheres coloured by element, bonds as lines, equal axes (Angstrom)."""
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    xyz = np.asarray(mol.GetConformer().GetPositions())
    z = [a.GetAtomicNum() for a in mol.GetAtoms()]
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        ax.plot(*xyz[[i, j]].T, color="#888888", linewidth=1.0 + 0.6 * (b.GetBondTypeAsDouble() - 1))
    ax.scatter(*xyz.T, c=[_COLOURS.get(n, _OTHER_COLOUR) for n in z],
               s=[_SIZES.get(n, _HEAVY_SIZE) for n in z], edgecolors="black", linewidths=0.4,
               depthshade=False)
    centre = xyz.mean(0)
    half = max(float(np.abs(xyz - centre).max()), 1.0) + 0.3
    for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre, strict=True):
        setter(c - half, c + half)
    ax.set_box_aspect((1, 1, 1))
    ax.set_axis_off()
    ax.set_title(f"{k}: {CalcMolFormula(mol)} (3D)", fontsize=9)
