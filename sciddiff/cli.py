"""The ``sciddiff`` command line.

    sciddiff bench samplers --out DIR [--quick] [--quiet]
    sciddiff --version

Each command is a function that adds its subparser to ``COMMANDS`` (and sets ``handler``), so new
commands (generate, evaluate, downscale, train) plug in with one function and one list entry. This
module imports nothing heavy at import time: ``sciddiff --help`` does not load torch.
"""

from __future__ import annotations

import argparse
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
    p.set_defaults(handler=_bench_samplers)


def _bench_samplers(args: argparse.Namespace) -> int:
    mod = load_benchmark("samplers")
    try:
        mod.run(args.out, quick=args.quick, problems=args.problems, quiet=args.quiet,
                n_samples=args.samples, nfes=args.nfe, repeats=args.repeats,
                threads=args.threads or None, include_diffusers=not args.no_diffusers)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    if not args.quiet:
        print(Path(args.out, "samplers.md").resolve())
    return 0


# Each adds one subcommand; keep the order of `sciddiff --help`.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_bench]


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
