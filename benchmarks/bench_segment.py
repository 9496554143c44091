"""Benchmark ``neonb segment``: seconds per scan against a naive reference, timed in one run.

``--config paper`` (or ``demo``) builds a freshly initialised network of that chapter's
configuration (``params/<config>/01_pipeline.yaml``, ``training.model``, ``patch_size``,
``overlap``; untrained weights time the same as trained ones), exports it as a model folder
with :func:`neonb.export.export_run` (trained at 0.5 mm RAS for ``paper``, 1.5 mm for
``demo``) and writes a synthetic subject on the dHCP release's grid
(:func:`neonb.phantom.write_cohort` with ``voxel_size=0.5``: 2 x 217 x 290 x 290). ``--model``
takes an existing model folder instead.

Each row times, in the same process and one after the other:

* ``seconds``: ``neonb segment --t2 ... --t1 ... --model ... --out ...`` end to end
  (:func:`neonb.cli.main`: loading the model, reading and checking the inputs, resampling
  when the grids differ, pre-processing, sliding windows inside the head's bounding box,
  mapping back, writing every output);
* ``reference_seconds``: the naive path, MONAI's ``sliding_window_inference`` over the
  whole, uncropped volume at overlap 0.5, one window at a time, fp32 under
  ``torch.no_grad`` (network time only: it reads and writes nothing).

``--backends openvino,torch`` times ``neonb segment --backend`` once per backend, one row
each (``backend`` and ``precision`` as the sidecar records them); the reference is timed
once. ``windows`` and ``reference_windows`` count the windows of each, ``voxels_same`` the
fraction of voxels where a row's labels and the reference's agree, ``voxels_same_as_first``
where they agree with the first row's (with untrained weights these say little;
``benchmarks/README.md`` compares the paths on a trained model).

``--batch N`` adds a row for ``neonb segment --batch`` over ``N`` synthetic sessions on the
model's own grid: ``seconds`` with the reading and writing overlapping the network's work
(the default), ``reference_seconds`` one session after the other (``prefetch=False``), each
the best of two runs in the order one by one, overlapped, overlapped, one by one, and
``sessions_per_min`` for both.

Usage:
    .venv/bin/python benchmarks/bench_segment.py --config paper --out bench_segment.tsv
    .venv/bin/python benchmarks/bench_segment.py --backends openvino,torch --out t.tsv
    .venv/bin/python benchmarks/bench_segment.py --config demo --batch 20 --out demo.tsv
    .venv/bin/python benchmarks/bench_segment.py --model models/demo --out mine.tsv
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import yaml
from monai.inferers import sliding_window_inference

from neonb.cli import main as neonb_main
from neonb.data import read_manifest
from neonb.experiment import TrainingConfig
from neonb.export import ExportedModel, export_run, load_exported_model
from neonb.inference import foreground_box
from neonb.models import build_model
from neonb.phantom import write_cohort
from neonb.segmentation import plan_grid, prepare_image, segment_batch

ROOT = Path(__file__).resolve().parents[1]
VOXEL_SIZE_MM = {"paper": 0.5, "demo": 1.5}
"""The voxel size each configuration's network is trained at (paper: dHCP's 0.5 mm)."""

REFERENCE_OVERLAP = 0.5


def _training_config(name: str) -> TrainingConfig:
    params = yaml.safe_load((ROOT / "params" / name / "01_pipeline.yaml").read_text())
    training = {k: v for k, v in params["training"].items() if k not in ("cache_dir",)}
    return TrainingConfig.from_dict(training)


def _fresh_model_dir(name: str, work: Path, seed: int) -> Path:
    """A model folder of a freshly initialised network of configuration ``name``."""
    config = _training_config(name)
    run = work / f"run-{name}"
    run.mkdir(parents=True)
    torch.manual_seed(seed)
    torch.save(build_model(config.model).state_dict(), run / "model_best.pt")
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    log = {"epoch": [1], "val_dice": [np.nan], "val_dice_nobg": [np.nan], "epoch_time_s": [0.0]}
    pd.DataFrame(log).to_csv(run / "log.tsv", sep="\t", index=False)
    return export_run(
        run, work / f"model-{name}", voxel_size=VOXEL_SIZE_MM[name], orientation="RAS",
        description=f"untrained {name} network (benchmark)",
    )  # fmt: skip


def _subjects(folder: Path, n: int, voxel_size: float, seed: int) -> pd.DataFrame:
    root = write_cohort(folder, n=n, seed=seed, voxel_size=voxel_size, progress=False)
    return read_manifest(root, progress=False)


def _windows(shape: tuple[int, ...], patch: tuple[int, ...], overlap: float) -> int:
    """Windows MONAI's ``sliding_window_inference`` places over ``shape``."""
    count = 1
    for size, roi in zip(shape, patch, strict=True):
        step = max(int(roi * (1 - overlap)), 1)
        count *= 1 if size <= roi else -(-(size - roi) // step) + 1
    return count


def _reference(model: ExportedModel, t1w: Path, t2w: Path) -> tuple[float, np.ndarray, int]:
    """The naive path: uncropped volume, overlap 0.5, one window at a time, no_grad."""
    anchor = nib.load(t2w)
    mapping = plan_grid(anchor, model.orientation, model.voxel_size_mm)
    volumes = [np.asanyarray(nib.load(p).dataobj) for p in (t1w, t2w)][-len(model.channels) :]
    image = prepare_image(volumes, mapping, model.channels).as_tensor()
    network = model.model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        probs = sliding_window_inference(
            image[None], roi_size=model.patch_size, sw_batch_size=1,
            predictor=network, overlap=REFERENCE_OVERLAP, mode="constant",
        )  # fmt: skip
    seconds = time.perf_counter() - started
    labels = probs[0].argmax(0).to(torch.uint8).numpy()
    return seconds, labels, _windows(tuple(image.shape[1:]), model.patch_size, REFERENCE_OVERLAP)


def _time_segment(
    model_dir: Path, model: ExportedModel, row: pd.Series, out: Path, backend: str = "auto"
) -> dict:
    args = ["segment", "--t2", str(row["t2w"]), "--t1", str(row["t1w"]), "--backend", backend]
    started = time.perf_counter()
    code = neonb_main([*args, "--model", str(model_dir), "--out", str(out), "--device", "cpu"])
    seconds = time.perf_counter() - started
    if code != 0:
        sys.exit(f"neonb segment failed with exit status {code}")
    anchor = nib.load(row["t2w"])
    mapping = plan_grid(anchor, model.orientation, model.voxel_size_mm)
    volumes = [np.asanyarray(nib.load(row[k]).dataobj) for k in ("t1w", "t2w")]
    image = prepare_image(volumes[-len(model.channels) :], mapping, model.channels)
    box = foreground_box(image)
    shape = tuple(s.stop - s.start for s in box)
    labels = np.asarray(nib.load(next(out.glob("*_dseg.nii.gz"))).dataobj)
    windows = _windows(shape, model.patch_size, model.overlap)
    sidecar = json.loads(next(out.glob("*_dseg.json")).read_text())
    return {
        "seconds": seconds,
        "windows": windows,
        "labels": labels,
        "backend": sidecar["InferenceBackend"],
        "precision": sidecar["InferencePrecision"],
    }


def _batch_rows(model_dir: Path, model: ExportedModel, work: Path, n: int, seed: int) -> list[dict]:
    manifest = _subjects(work / "batch-cohort", n, model.voxel_size_mm[0], seed)
    tsv = work / "batch.tsv"
    manifest[["participant_id", "session_id", "scan_age", "t1w", "t2w"]].to_csv(
        tsv, sep="\t", index=False
    )
    timed: dict[bool, float] = {}
    for run, prefetch in enumerate((False, True, True, False)):  # alternating: fair to both
        started = time.perf_counter()
        result = segment_batch(
            model, tsv, work / f"batch-out-{run}", device="cpu", progress=False,
            prefetch=prefetch,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        timed[prefetch] = min(seconds, timed.get(prefetch, seconds))
        if result.count("done") != n:
            sys.exit(f"the batch segmented {result.count('done')} of {n} sessions")
    grid = "x".join(str(s) for s in nib.load(manifest.iloc[0]["t2w"]).shape)
    return [
        {
            "input": f"batch of {n} sessions ({grid}, {model.voxel_size_mm[0]:g} mm)",
            "seconds": timed[True],
            "reference_seconds": timed[False],
            "sessions_per_min": 60 * n / timed[True],
            "reference_sessions_per_min": 60 * n / timed[False],
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", choices=sorted(VOXEL_SIZE_MM), default="paper",
                        help="a fresh network of this configuration (default paper)")  # fmt: skip
    source.add_argument("--model", type=Path, help="an exported model folder instead")
    parser.add_argument("--out", type=Path, required=True, help="the TSV to write")
    parser.add_argument("--batch", type=int, default=0, help="also time a batch of N sessions")
    parser.add_argument("--seed", type=int, default=0, help="phantom and weight seed (default 0)")
    parser.add_argument("--backends", default="auto",
                        help="neonb segment --backend values to time, one row each, "
                        "comma-separated (default auto; e.g. openvino,torch)")  # fmt: skip
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model or _fresh_model_dir(args.config, work, args.seed)
        model = load_exported_model(model_dir)
        filters = model.metadata["model"].get("filters") or "default filters"
        print(f"model: {model.metadata['architecture']} {filters}, "
              f"{'x'.join(map(str, model.patch_size))} windows, overlap {model.overlap:g}, "
              f"trained at {model.voxel_size_mm[0]:g} mm")  # fmt: skip
        print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f} at the start")  # fmt: skip
        rows = []
        subject = _subjects(work / "dhcp", 1, 0.5, args.seed).iloc[0]
        timed = [
            _time_segment(model_dir, model, subject, work / f"out-{backend}", backend)
            for backend in args.backends.split(",")
        ]
        ref_s, ref_labels, ref_windows = _reference(model, subject["t1w"], subject["t2w"])
        for ours in timed:
            same = np.nan  # comparable only on the model's own grid
            if ref_labels.shape == ours["labels"].shape:
                same = float((ours["labels"] == ref_labels).mean())
            first = float((ours["labels"] == timed[0]["labels"]).mean())
            rows.append(
                {
                    "input": "dHCP grid (0.5 mm, 217x290x290)",
                    "backend": ours["backend"],
                    "precision": ours["precision"],
                    "seconds": ours["seconds"],
                    "reference_seconds": ref_s,
                    "windows": ours["windows"],
                    "reference_windows": ref_windows,
                    "voxels_same": same,
                    "voxels_same_as_first": first,
                }
            )
        if args.batch:
            rows += _batch_rows(model_dir, model, work, args.batch, args.seed)
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
    table = pd.DataFrame(rows)
    table.to_csv(args.out, sep="\t", index=False, float_format="%.4g", na_rep="n/a")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
