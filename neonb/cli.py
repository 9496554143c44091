"""The ``neonb`` command line: thin wrappers over the library's functions.

Every sub-command turns a :class:`neonb.errors.NeonbError` into a one-line message on
standard error and exit status 1; anything else is a bug and keeps its traceback. A
:class:`neonb.errors.NeonbWarning` (an input neonb can use but whose header disagrees with
itself, say) is one line on standard error too, and the command goes on.
Heavy imports (torch, MONAI) happen inside the sub-commands so ``neonb --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from neonb import __version__
from neonb.errors import NeonbError, NeonbWarning


def _phantom(args: argparse.Namespace) -> None:
    from neonb.phantom import write_cohort

    root = write_cohort(args.out, n=args.n, seed=args.seed, voxel_size=args.voxel_size)
    print(f"synthetic cohort of {args.n} sessions at {args.voxel_size:g} mm written to {root}")


def _manifest(args: argparse.Namespace) -> None:
    from neonb.data import read_manifest, summarize_manifest, write_manifest

    manifest = read_manifest(
        args.root, images=args.images, brain_mask=args.brain_mask, check=args.check
    )
    print(summarize_manifest(manifest))
    if args.out:
        print(f"manifest written to {write_manifest(manifest, args.out)}")


def _study(args: argparse.Namespace) -> None:
    from neonb.study import run_study

    if args.plan:
        from neonb.plan import check_plan

        check_plan(args.params, data_root=args.data)
        return
    run_study(args.params, data_root=args.data, book=not args.no_book, jobs=args.jobs)


def _train(args: argparse.Namespace) -> None:
    from neonb import distributed
    from neonb.runs import list_runs, train_chapter

    distributed.init_from_env()
    try:
        if args.list:
            list_runs(args.params, args.chapter, data_root=args.data)
        else:
            train_chapter(
                args.params,
                args.chapter,
                args.run,
                data_root=args.data,
                progress=not args.no_progress,
            )
    finally:
        distributed.shutdown()


def _export(args: argparse.Namespace) -> None:
    from neonb.errors import ConfigError
    from neonb.export import describe_qc, export_run, load_exported_model

    calibrate = args.calibrate_qc
    if args.no_calibrate_qc:
        if calibrate is not None:
            raise ConfigError("give --calibrate-qc SESSIONS or --no-calibrate-qc, not both")
        calibrate = False
    elif not 0 < args.qc_quantile <= 1:
        raise ConfigError(f"--qc-quantile must be in (0, 1], got {args.qc_quantile}")
    out = export_run(
        args.run_dir,
        args.out,
        data_root=args.data_root,
        voxel_size=args.voxel_size,
        orientation=args.orientation,
        description=args.description,
        images=args.images,
        norms=args.norms,
        calibrate_qc="auto" if calibrate is None else calibrate,
        qc_quantile=args.qc_quantile,
        overlap=args.overlap,
        device=args.device,
        progress=True,
    )
    print(f"model exported to {out}")
    qc = load_exported_model(out).metadata.get("qc")
    if qc is not None:
        print(f"{describe_qc(qc)}, written to {out / 'model.json'}")


PRECISION_AMP: dict[str, bool | str] = {"auto": "native", "fp32": False, "bf16": True}
"""``neonb segment --precision`` -> the ``amp`` of :func:`neonb.segmentation.segment_scan`."""


def _segment(args: argparse.Namespace) -> None:
    from neonb.errors import ConfigError, DataError
    from neonb.export import load_exported_model
    from neonb.segmentation import flagged_sessions, segment_batch, segment_scan

    if args.batch is not None and (args.t1 or args.reference or args.scan_age is not None):
        raise ConfigError(
            "--t1, --reference and --scan-age go with one scan (--t2, --t1); a batch takes "
            "them from its manifest"
        )
    if args.batch is None and args.t2 is None and args.t1 is None:
        raise ConfigError(
            "give the scan to segment (--t2 T2W, --t1 T1W or both: the model's input channels) "
            "or --batch ROOT_OR_TSV"
        )
    if args.batch is None and args.evaluate:
        raise ConfigError("--evaluate goes with --batch; with one scan, give --reference DSEG")
    model = load_exported_model(args.model)
    if args.batch is None:
        result = segment_scan(
            model,
            args.t2,
            args.out,
            t1w=args.t1,
            reference=args.reference,
            scan_age=args.scan_age,
            device=args.device,
            amp=PRECISION_AMP[args.precision],
            tta=args.tta,
            backend=args.backend,
        )
        for note in result.notes:
            print(f"note: {note}")
        if result.qc_uncertainty is not None:
            verdict = {True: "FLAGGED: check this segmentation", False: "below the threshold"}
            print(
                f"QC uncertainty {result.qc_uncertainty:.4f}: "
                f"{verdict.get(result.qc_flag, 'no threshold in the model folder')}"
            )
        print(f"segmentation written to {result.outputs['dseg']} ({result.seconds:.1f} s)")
        if result.ages is not None:
            print(f"predicted scan age: {result.ages['mean']:.1f} weeks PMA")
        return
    result = segment_batch(
        model, args.batch, args.out, evaluate=args.evaluate, device=args.device, progress=True,
        amp=PRECISION_AMP[args.precision], tta=args.tta, backend=args.backend,
    )  # fmt: skip
    counts = {status: result.count(status) for status in ("done", "skipped", "failed")}
    print(
        f"{len(result.summary)} sessions: {counts['done']} segmented, "
        f"{counts['skipped']} already done, {counts['failed']} failed; "
        f"summary in {result.summary_path}"
    )
    flagged = flagged_sessions(result.summary)
    if flagged:
        print(f"{len(flagged)} flagged by QC (uncertainty above the model's threshold):")
        for name in flagged:
            print(f"  {name}")
    if counts["failed"]:
        raise DataError(
            result.summary_path,
            f"{counts['failed']} of {len(result.summary)} sessions failed",
            hint="their errors are listed there; run the same command again to retry them",
        )


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
    manifest.add_argument(
        "root",
        type=Path,
        help="[REQUIRED] dHCP release folder, its derivatives/dhcp_anat_pipeline, or a "
        "synthetic cohort",
    )
    manifest.add_argument("--out", type=Path, help="[OPTIONAL] write the manifest to this TSV")
    manifest.add_argument(
        "--images",
        choices=("restore", "plain"),
        default="restore",
        help="[OPTIONAL] which T1w/T2w pair: the bias-corrected desc-restore images (default) "
        "or the plain _T1w/_T2w, as the paper's authors used",
    )
    manifest.add_argument(
        "--brain-mask",
        choices=("ignore", "apply"),
        default="ignore",
        help="[OPTIONAL] 'apply': a session needs its desc-brain_mask (checked with --check); "
        "'ignore' (default): the mask is listed but not required",
    )
    manifest.add_argument(
        "--check",
        action="store_true",
        help="[OPTIONAL] also open every image: shapes, affines, labels 0-9, binary brain "
        "masks, no NaN (slow)",
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
    study.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="[OPTIONAL] chapters run at once, each with cores // jobs threads; chapters that "
        "read another's results wait for it (default: jobs in the folder's study.yaml, else 1)",
    )
    study.add_argument(
        "--plan",
        action="store_true",
        help="train nothing: resolve the data, draw or read the splits, lay out every "
        "chapter's sets and runs, and write plan.tsv to the results folder",
    )
    study.set_defaults(handler=_study)

    train = commands.add_parser(
        "train",
        help="train a chapter's runs outside the notebooks (one process, or many under torchrun)",
        description="Train the runs a chapter's notebook would train, with the same settings, "
        "seeds and run folders; finished runs are left alone, partial ones resume. Under "
        "torchrun (--nproc_per_node, --nnodes) every run trains with DistributedDataParallel; "
        "batch_size stays the batch of one optimiser step, split over the processes. The "
        "notebooks (neonb study) then find the finished runs and only evaluate them.",
    )
    train.add_argument(
        "--params",
        type=Path,
        required=True,
        help="[REQUIRED] parameters folder: params/smoke, params/demo or params/paper",
    )
    train.add_argument(
        "--chapter",
        required=True,
        help="[REQUIRED] 01_pipeline, 02_ageunet, 03_budgeting, 04_transfer or 06_robustness",
    )
    train.add_argument(
        "--run",
        nargs="+",
        metavar="ID",
        help="[OPTIONAL] the runs to train, by id (see --list or neonb study --plan); "
        "default: all of the chapter's",
    )
    train.add_argument(
        "--data",
        type=str,
        default=None,
        help="[OPTIONAL] dHCP release folder; default: the parameters' (the synthetic cohort)",
    )
    train.add_argument(
        "--list",
        action="store_true",
        help="train nothing: list the chapter's runs, each finished, partial (resumable) or "
        "not started",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)

    export = commands.add_parser(
        "export", help="write a trained run as a model folder (safetensors weights + JSON)"
    )
    export.add_argument("run_dir", type=Path, help="[REQUIRED] a finished training run folder")
    export.add_argument(
        "--out", type=Path, required=True, metavar="MODEL_DIR", help="[REQUIRED] folder to write"
    )
    export.add_argument(
        "--data-root",
        type=Path,
        metavar="ROOT",
        help="[RECOMMENDED] the training data folder: gives the voxel size and orientation "
        "the model was trained on, and the data description",
    )
    export.add_argument(
        "--voxel-size",
        type=float,
        nargs="+",
        metavar="MM",
        help="[OPTIONAL] voxel size of the training images in mm (one or three values)",
    )
    export.add_argument(
        "--orientation", help="[OPTIONAL] axis codes of the training images, e.g. RAS"
    )
    export.add_argument("--description", help="[OPTIONAL] one sentence on the training data")
    export.add_argument(
        "--images",
        choices=("restore", "plain"),
        default="restore",
        help="the T1w/T2w kind the run was trained on (params' images:); segment --batch on a "
        "release folder reads the same kind (default restore)",
    )
    export.add_argument(
        "--norms",
        type=Path,
        metavar="TSV",
        help="[OPTIONAL] tissue volumes to fit the age norms on (chapter 00's "
        "tissue_volumes.tsv); default: the label images of --data-root, but its test sessions",
    )
    export.add_argument(
        "--calibrate-qc",
        type=Path,
        metavar="ROOT_OR_TSV",
        help="[OPTIONAL] sessions the run did not train on, as a manifest TSV or a release "
        "folder, to calibrate the QC threshold on instead of the run's validation sessions. "
        "By default each validation session the run recorded (val_sessions.tsv) is segmented "
        "with --tta and the --qc-quantile of their QC scores becomes the model's QC threshold "
        "(neonb segment --tta flags above it); without them the export says why and has none",
    )
    export.add_argument(
        "--no-calibrate-qc",
        action="store_true",
        help="[OPTIONAL] no QC threshold: skip the calibration",
    )
    export.add_argument(
        "--qc-quantile",
        type=float,
        default=0.95,
        metavar="Q",
        help="[OPTIONAL] quantile of the calibration scores taken as threshold (default 0.95)",
    )
    export.add_argument(
        "--overlap",
        type=float,
        metavar="F",
        help="[OPTIONAL] sliding-window overlap in [0, 1) that neonb segment and the QC "
        "calibration use with this model (default: the run's); 0 needs the fewest windows",
    )
    export.add_argument(
        "--device",
        default="auto",
        help="for the QC calibration: auto (GPU when there is one), cpu or cuda",
    )
    export.set_defaults(handler=_export)

    segment = commands.add_parser(
        "segment",
        help="segment neonatal T2w and/or T1w scans (the model's input channels) with an "
        "exported model",
    )
    inputs = segment.add_mutually_exclusive_group()
    inputs.add_argument(
        "--t2",
        type=Path,
        metavar="T2W",
        help="[REQUIRED: the images the model takes, or --batch] the T2w image (NIfTI); the "
        "outputs take its grid and name",
    )
    inputs.add_argument(
        "--batch",
        type=Path,
        metavar="ROOT_OR_TSV",
        help="[REQUIRED: the images the model takes, or --batch] a dHCP/BIDS folder, or a TSV "
        "with participant_id, session_id, scan_age and a column per input channel of the model "
        "(t2w, t1w) [, dseg]: segment every session, skipping those done",
    )
    segment.add_argument(
        "--t1",
        type=Path,
        metavar="T1W",
        help="the T1w image (if the model takes T1w), on the T2w's grid when both are given; "
        "a T1w-only model's outputs take its grid and name",
    )
    segment.add_argument(
        "--reference",
        type=Path,
        metavar="DSEG",
        help="[OPTIONAL] a drawem9 segmentation (labels 0-9) to compute Dice against",
    )
    segment.add_argument(
        "--scan-age",
        "--age",
        type=float,
        metavar="WEEKS",
        help="[OPTIONAL] the scan age (weeks PMA): with a model that has norms, each tissue "
        "volume gets its centile for this age; written beside a predicted age",
    )
    segment.add_argument(
        "--evaluate",
        action="store_true",
        help="[OPTIONAL] with --batch: compute Dice against each session's dseg",
    )
    segment.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="MODEL_DIR",
        help="[REQUIRED] a folder written by neonb export",
    )
    segment.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="[REQUIRED] output folder"
    )
    segment.add_argument(
        "--device", default="auto", help="auto (GPU when there is one), cpu or cuda"
    )
    segment.add_argument(
        "--precision",
        choices=sorted(PRECISION_AMP),
        default="auto",
        help="what the network computes in: auto (bf16 on a GPU or a CPU with native bf16, "
        "about twice as fast, labels within Dice 0.999 of fp32; fp32 elsewhere), fp32, bf16",
    )
    segment.add_argument(
        "--backend",
        choices=("auto", "torch", "openvino"),
        default="auto",
        help="what runs the network: auto (the default: OpenVINO on the CPU where installed, "
        "about twice as fast there, else PyTorch), torch, openvino (the CPU only)",
    )
    segment.add_argument(
        "--tta",
        action="store_true",
        help="[OPTIONAL] flip test-time augmentation (the training's flips: 8 passes, about 8 "
        "times the time): averaged probabilities, an _uncertainty.nii.gz map (entropy / ln C, "
        "0-1), a QC score (its mean inside the brain) and a flag above the model's threshold",
    )
    segment.set_defaults(handler=_segment)
    return parser


def _one_line_warnings(command: str, show: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints a :class:`NeonbWarning` as one line."""

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if issubclass(category, NeonbWarning):
            text = " ".join(str(message).split())
            print(f"neonb {command}: warning: {text}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neonb`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", NeonbWarning)
            warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
            handler(args)
    except NeonbError as error:
        message = " ".join(str(error).split())  # one line, whatever the library said
        print(f"neonb {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"neonb {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
