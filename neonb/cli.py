"""The ``neonb`` command line: thin wrappers over the library's functions.

Every sub-command turns a :class:`neonb.errors.NeonbError` into a one-line message on
standard error and exit status 1; anything else is a bug and keeps its traceback.
Heavy imports (torch, MONAI) happen inside the sub-commands so ``neonb --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from neonb import __version__
from neonb.errors import NeonbError


def _phantom(args: argparse.Namespace) -> None:
    from neonb.phantom import write_cohort

    root = write_cohort(args.out, n=args.n, seed=args.seed, voxel_size=args.voxel_size)
    print(f"synthetic cohort of {args.n} sessions at {args.voxel_size:g} mm written to {root}")


def _manifest(args: argparse.Namespace) -> None:
    from neonb.data import read_manifest, summarize_manifest, write_manifest

    manifest = read_manifest(args.root, check=args.check)
    print(summarize_manifest(manifest))
    if args.out:
        print(f"manifest written to {write_manifest(manifest, args.out)}")


def _study(args: argparse.Namespace) -> None:
    from neonb.study import run_study

    run_study(args.params, data_root=args.data, book=not args.no_book)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``neonb`` command (also used to document it)."""
    parser = argparse.ArgumentParser(
        prog="neonb",
        description="Neonatal brain MRI segmentation and label-efficient studies "
        "(Richter & Fetit 2022, reproduced).",
    )
    parser.add_argument("--version", action="version", version=f"neonb {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    phantom = commands.add_parser(
        "phantom", help="write a synthetic neonatal cohort in the dHCP release layout"
    )
    phantom.add_argument("out", type=Path, help="[REQUIRED] output folder")
    phantom.add_argument("--n", type=int, default=60, help="number of sessions (default 60)")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    phantom.add_argument(
        "--voxel-size",
        type=float,
        default=1.5,
        help="isotropic voxel size in mm; 0.5 gives the dHCP grid 217x290x290 (default 1.5)",
    )
    phantom.set_defaults(handler=_phantom)

    manifest = commands.add_parser(
        "manifest", help="list the sessions of a dHCP release folder and which are complete"
    )
    manifest.add_argument("root", type=Path, help="[REQUIRED] dHCP release (or synthetic) folder")
    manifest.add_argument("--out", type=Path, help="[OPTIONAL] write the manifest to this TSV")
    manifest.add_argument(
        "--check",
        action="store_true",
        help="[OPTIONAL] also open every image: shapes, affines, labels 0-9, no NaN (slow)",
    )
    manifest.set_defaults(handler=_manifest)

    study = commands.add_parser(
        "study", help="run the study notebooks with papermill and build the Jupyter Book"
    )
    study.add_argument(
        "--params",
        type=Path,
        default=Path("params/demo"),
        help="parameters folder: params/smoke, params/demo (default) or params/paper",
    )
    study.add_argument(
        "--data",
        type=str,
        default=None,
        help="[OPTIONAL] dHCP release folder; default: the synthetic cohort",
    )
    study.add_argument("--no-book", action="store_true", help="run the notebooks only")
    study.set_defaults(handler=_study)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neonb`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except NeonbError as error:
        print(f"neonb {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"neonb {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
