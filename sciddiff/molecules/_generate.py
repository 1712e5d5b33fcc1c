"""Sampling molecules from a trained generator: ``load_generator``, ``sample_molecules``, ``generate``.

A generator directory holds the engine checkpoint (``model.safetensors``, ``state.json``) and
``molecule.json`` (atom types, ``h_scale``, the training set's atom-count histogram, recommended
sampler), as written by ``train_molecules``. Sampling follows EDM (Hoogeboom et al. 2022, Sec. 3.4):
draw each molecule's size from the histogram, integrate from the prior (zero-CoM Gaussian positions,
Gaussian atom-type features) with any engine sampler, decode the type as the argmax of ``h``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from .. import samplers as S
from ..core import EDM, GaussianProcess, Model, State
from ._types import ATOM_SYMBOLS, Molecule

if TYPE_CHECKING:  # pragma: no cover
    from rdkit import Chem

    from ._convert import NumAtomsDistribution

MOLECULE_FILE = "molecule.json"
MOLECULE_FORMAT = "sciddiff-molecule/1"
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "qm9_default"

SamplerName = Literal["dpmpp_2m", "heun", "unipc", "dpmpp_pc", "ddim", "ddpm", "euler", "euler_maruyama",
                      "pc_langevin", "flow_euler", "flow_heun", "flow_midpoint"]
GridName = Literal["default", "edm_rho", "logsnr_uniform", "uniform_time", "trailing"]


@dataclass(frozen=True)
class _SamplerSpec:
    """A sampler function, its steps for a budget of ``nfe`` model calls, and whether it is
    stochastic (needs a generator)."""

    fn: Callable[..., Any]
    steps: Callable[[int], int]
    stochastic: bool = False


def _one_per_step(nfe: int) -> int:
    return nfe


def _two_per_step_last_one(nfe: int) -> int:
    return (nfe + 1) // 2  # Heun-type: 2 calls per step, 1 on the step into the clean point


def _two_per_step(nfe: int) -> int:
    return nfe // 2


SAMPLERS: dict[str, _SamplerSpec] = {
    "dpmpp_2m": _SamplerSpec(S.dpmpp_2m, _one_per_step),
    "heun": _SamplerSpec(S.heun, _two_per_step_last_one),
    "unipc": _SamplerSpec(S.unipc, _one_per_step),
    "dpmpp_pc": _SamplerSpec(S.dpmpp_pc, _one_per_step),
    "ddim": _SamplerSpec(S.ddim, _one_per_step),
    "ddpm": _SamplerSpec(S.ddpm, _one_per_step, stochastic=True),
    "euler": _SamplerSpec(S.euler, _one_per_step),
    "euler_maruyama": _SamplerSpec(S.euler_maruyama, _one_per_step, stochastic=True),
    "pc_langevin": _SamplerSpec(S.pc_langevin, _two_per_step_last_one, stochastic=True),
    "flow_euler": _SamplerSpec(S.flow_euler, _one_per_step),
    "flow_heun": _SamplerSpec(S.flow_heun, _two_per_step_last_one),
    "flow_midpoint": _SamplerSpec(S.flow_midpoint, _two_per_step),
}
GRIDS: dict[str, Callable[[GaussianProcess, int], S.TimeGrid]] = {
    "edm_rho": S.edm_rho, "logsnr_uniform": S.logsnr_uniform, "uniform_time": S.uniform_time,
    "trailing": S.trailing,
}


def make_grid(process: GaussianProcess, steps: int, grid: GridName = "default") -> S.TimeGrid:
    """Time grid of ``steps`` steps; ``"default"``: Karras et al. 2022's ``edm_rho`` for the EDM
    process, otherwise ``default_grid`` (log-SNR uniform; uniform in t for flow paths)."""
    if grid == "default":
        return S.edm_rho(process, steps) if isinstance(process, EDM) else S.default_grid(process, steps)
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {get_args(GridName)}")
    return GRIDS[grid](process, steps)


# ------------------------------------------------------------------------------------------------
@dataclass
class MoleculeGenerator:
    """A loaded molecule generator.

    Attributes:
        model: network (EMA weights) + process + parameterization, in eval mode on ``device``.
        num_atoms: the training set's atom-count distribution (sizes drawn when not given).
        h_scale: scale of the one-hot atom-type features.
        info: the parsed ``molecule.json``.
        path: the directory it was loaded from.
        device: where the network lives.
    """

    model: Model
    num_atoms: NumAtomsDistribution
    h_scale: float
    info: dict[str, Any]
    path: Path
    device: torch.device

    def sample(self, n: int, **kwargs: Any) -> list[Molecule]:
        """``sample_molecules(n, checkpoint=self, **kwargs)``."""
        return sample_molecules(n, checkpoint=self, **kwargs)


def load_generator(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                   ema: bool = True) -> MoleculeGenerator:
    """Load a generator written by ``train_molecules`` (None: the bundled QM9 model in
    ``sciddiff/molecules/checkpoints/qm9_default/``). ``ema``: use the EMA weights where present.
    Loads are cached per (directory, checkpoint version, device, ema)."""
    d = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not (d / "state.json").is_file() or not (d / MOLECULE_FILE).is_file():
        what = "the bundled QM9 checkpoint" if path is None else "a molecule generator"
        raise FileNotFoundError(
            f"{d}: {what} needs state.json, model.safetensors and {MOLECULE_FILE}, which are not all "
            "there; train one with sciddiff.molecules.train_molecules(...) (configs/cpu.json is a "
            "one-hour CPU run) and pass its directory as checkpoint="
        )
    stamp = (d / "state.json").stat().st_mtime_ns
    return _load_cached(str(d.resolve()), stamp, str(torch.device(device)), ema)


def export_generator(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     dtype: Literal["float32", "float16", "bfloat16"] = "float16") -> Path:
    """An inference-only copy of a generator directory (the bundled model is one, in float32).

    The EMA weights become the network's, stored as ``dtype`` (the 9 x 256 EGNN: 10.7 MB in
    float16 against 42.7 MB for raw + EMA in float32); no optimizer or RNG state. ``molecule.json``,
    the training ``config.json`` and ``history.json`` are copied. ``load_generator(out_dir)`` reads
    it, casting the weights back to float32. Returns ``out_dir`` as a ``Path``.
    """
    import shutil

    from ..training import export_checkpoint

    src, dst = Path(run_dir), Path(out_dir)
    if not (src / MOLECULE_FILE).is_file():
        raise FileNotFoundError(f"{src}: not a molecule generator directory (no {MOLECULE_FILE})")
    export_checkpoint(src, dst, dtype=dtype)
    for name in (MOLECULE_FILE, "config.json", "history.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, stamp: int, device: str, ema: bool) -> MoleculeGenerator:
    from ..training import DiffusionModule
    from ._convert import NumAtomsDistribution

    d = Path(path)
    info_file = d / MOLECULE_FILE
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{info_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(info, dict) or info.get("format") != MOLECULE_FORMAT:
        raise ValueError(f"{info_file}: 'format' must be {MOLECULE_FORMAT!r}")
    for key in ("atom_types", "h_scale", "num_atoms"):
        if key not in info:
            raise ValueError(f"{info_file}: missing key {key!r}")
    if list(info["atom_types"]) != list(ATOM_SYMBOLS):
        raise ValueError(f"{info_file}: 'atom_types' {info['atom_types']} differ from {list(ATOM_SYMBOLS)}")
    try:
        num_atoms = NumAtomsDistribution.from_dict(info["num_atoms"])
    except ValueError as e:
        raise ValueError(f"{info_file}: key 'num_atoms': {e}") from None
    h_scale = info["h_scale"]
    if not isinstance(h_scale, (int, float)) or not h_scale > 0:
        raise ValueError(f"{info_file}: key 'h_scale' must be a positive number, got {h_scale!r}")
    module = DiffusionModule.from_checkpoint(d)
    model = module.sampling_model(ema=ema and module.ema is not None)
    model.net.to(device)
    return MoleculeGenerator(model, num_atoms, float(h_scale), info, d, torch.device(device))


# ------------------------------------------------------------------------------------------------
def sample_molecules(
    n: int,
    *,
    checkpoint: str | os.PathLike | MoleculeGenerator | None = None,
    sampler: SamplerName | None = None,
    nfe: int | None = None,
    grid: GridName | S.TimeGrid | None = None,
    num_atoms: int | Sequence[int] | None = None,
    seed: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[Molecule]:
    """Generate ``n`` molecules (EDM's sampling, Hoogeboom et al. 2022, Sec. 3.4).

    Args:
        n: number of molecules (>= 1).
        checkpoint: a generator directory, a loaded ``MoleculeGenerator``, or None (bundled model).
        sampler: an engine sampler (``SamplerName``); None: the one recorded at training
            (``molecule.json``), else ``"dpmpp_2m"``.
        nfe: model evaluations per molecule (steps are derived per sampler: Heun-type samplers
            take ``(nfe + 1) // 2`` steps); None: the recorded value, else 50.
        grid: time grid (``GridName``, or a ``TimeGrid`` such as ``learn_grid(...).grid`` whose
            steps match ``nfe`` for ``sampler``); None: the recorded one, else ``"default"``.
        num_atoms: None (sizes drawn from the training histogram), one size for all, or ``n`` sizes.
        seed: makes the result reproducible (sizes and prior are drawn on the CPU, so also across
            devices up to floating-point differences); None: fresh randomness.
        batch_size: molecules per sampler call.
        device: where the network runs.
        progress: show a progress bar per batch.

    Returns: ``n`` ``Molecule`` objects (positions in Angstrom, zero centre of mass).
    """
    from ._convert import prior_state

    gen = checkpoint if isinstance(checkpoint, MoleculeGenerator) else load_generator(checkpoint,
                                                                                      device=device)
    rec = gen.info.get("sampler", {})
    sampler = sampler or rec.get("name", "dpmpp_2m")
    nfe = nfe if nfe is not None else int(rec.get("nfe", 50))
    spec, steps = _check_sampling_args(n, sampler, nfe, batch_size)
    if isinstance(grid, S.TimeGrid):
        if grid.steps != steps:
            raise ValueError(f"sample_molecules: the grid has {grid.steps} steps; {sampler!r} at "
                             f"nfe={nfe} takes {steps}")
        tgrid = grid
    else:
        tgrid = make_grid(gen.model.process, steps, grid or rec.get("grid", "default"))
    cpu_gen = torch.Generator()
    if seed is None:
        cpu_gen.seed()
    else:
        cpu_gen.manual_seed(int(seed))
    sizes = _sizes(n, num_atoms, gen.num_atoms, cpu_gen)
    # The whole prior is drawn at once, so a seed gives the same molecules for every batch_size
    # (stochastic samplers then draw their noise batch by batch, on the network's device).
    prior = prior_state(sizes, gen.model.process, cpu_gen, torch.float32)
    noise_gen = None
    if spec.stochastic:
        noise_seed = int(torch.randint(2**62, (1,), generator=cpu_gen))
        noise_gen = torch.Generator(gen.device).manual_seed(noise_seed)
    mols = _integrate(gen, spec, tgrid, prior, sizes, batch_size, noise_gen, progress)
    for i, mol in enumerate(mols):
        mol.name = f"sciddiff sample {i}"
    return mols


def _integrate(gen: MoleculeGenerator, spec: _SamplerSpec, grid: S.TimeGrid, prior: State,
               sizes: torch.Tensor, batch_size: int, noise_gen: torch.Generator | None,
               progress: bool) -> list[Molecule]:
    """Run the sampler from ``prior`` (all molecules, flat) in batches of ``batch_size`` molecules
    and decode each result (argmax atom types, EDM Sec. 3.3)."""
    from ._convert import state_to_molecules

    ptr = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]).tolist()
    kwargs: dict[str, Any] = {"progress": progress}
    if noise_gen is not None:
        kwargs["generator"] = noise_gen
    out: list[Molecule] = []
    for start in range(0, len(sizes), batch_size):
        x = _systems(prior, ptr, start, min(start + batch_size, len(sizes))).to(gen.device)
        x = spec.fn(gen.model, x, grid, **kwargs)
        out.extend(state_to_molecules(x.to("cpu"), scale_h=gen.h_scale))
    return out


def _systems(x: State, ptr: list[int], start: int, stop: int) -> State:
    """Molecules ``start:stop`` of a flat State whose atoms are stored molecule by molecule
    (``ptr [B+1]``: atom offsets)."""
    a, b = ptr[start], ptr[stop]
    batch = x.batch["pos"][a:b] - start
    return State({k: v[a:b] for k, v in x.items()}, batch={k: batch for k in x.keys()},
                 num_systems=stop - start, constraints=x.constraints)


def _check_sampling_args(n: int, sampler: str, nfe: int, batch_size: int) -> tuple[_SamplerSpec, int]:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"sample_molecules: n must be a positive integer, got {n!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sample_molecules: unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sample_molecules: batch_size must be a positive integer, got {batch_size!r}")
    spec = SAMPLERS[sampler]
    steps = spec.steps(nfe) if isinstance(nfe, int) else 0
    if steps < 1:
        raise ValueError(f"sample_molecules: nfe={nfe!r} is too small for {sampler!r} (no step left)")
    return spec, steps


def _sizes(n: int, num_atoms: int | Sequence[int] | None, hist: NumAtomsDistribution,
           generator: torch.Generator) -> torch.Tensor:
    """Atom counts ``[n]`` (long): drawn from ``hist``, one repeated value, or the given list."""
    if num_atoms is None:
        return hist.sample(n, generator)
    if isinstance(num_atoms, int):
        sizes = torch.full((n,), num_atoms, dtype=torch.long)
    else:
        vals = list(num_atoms)
        if len(vals) != n or not all(isinstance(v, int) for v in vals):
            raise ValueError(f"sample_molecules: num_atoms must be None, an int or {n} ints "
                             f"(one per molecule); got {len(vals)} values")
        sizes = torch.tensor(vals, dtype=torch.long)
    if int(sizes.min()) < 1:
        raise ValueError(f"sample_molecules: every molecule needs >= 1 atom, got {int(sizes.min())}")
    return sizes


# ------------------------------------------------------------------------------------------------
def generate(n: int = 100, *, out: str | os.PathLike | None = None, sanitize: bool = True,
             **kwargs: Any) -> list[Chem.Mol]:
    """Generate ``n`` molecules as RDKit ``Mol`` objects with a 3D conformer and bonds inferred with
    EDM's bond-length rules (``to_rdkit``); ``sanitize``: sanitized where RDKit accepts them (those
    it rejects are returned unsanitized, with the property ``sanitized = 0``). ``out``: also write
    them to this SD file, atomically. Other keyword arguments go to ``sample_molecules``."""
    from rdkit import Chem, rdBase

    from ._bonds import to_rdkit
    from ._io import write_sdf

    mols = []
    for mol in sample_molecules(n, **kwargs):
        rd = to_rdkit(mol, sanitize=False)
        ok = False
        if sanitize:
            trial = Chem.Mol(rd)
            with rdBase.BlockLogs():  # a rejected molecule is an expected outcome, not an error to log
                ok = Chem.SanitizeMol(trial, catchErrors=True) == Chem.SanitizeFlags.SANITIZE_NONE
            rd = trial if ok else rd
        rd.SetProp("_Name", mol.name)
        rd.SetIntProp("sanitized", int(ok))
        mols.append(rd)
    if out is not None:
        write_sdf(out, mols)
    return mols
