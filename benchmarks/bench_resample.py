"""Benchmark how ``neonb segment`` maps a prediction back to an input of another voxel size.

When an input's voxel size differs from the model's, the network predicts on the model's
grid and the result goes back to the input's grid. Two ways are compared, from the same
network output of each session:

* ``old``: the label map (argmax on the model's grid) resampled by nearest neighbour
  (:func:`neonb.segmentation.from_model_grid`, what ``neonb segment`` did before issue 18);
* ``new``: each class probability resampled by linear interpolation and the argmax taken on
  the input's grid (:func:`neonb.segmentation.from_model_grid_probabilities`, as nnU-Net;
  what ``neonb segment`` does now).

Synthetic subjects the model did not train on are written at each ``--voxel-sizes`` value
(:func:`neonb.phantom.write_cohort`, a seed other than the training cohort's), segmented with
the model folder (``--model``, or ``--run`` exported with ``--data-root``), and each way's
labels are compared with the subject's reference labels at that voxel size: the mean Dice
over the nine tissue classes, and the seconds the mapping back took.

Usage:
    .venv/bin/python benchmarks/bench_resample.py --run results/demo/01_pipeline/run-0 \\
        --data-root data/synthetic-n60-1.5mm-seed0 --voxel-sizes 1.0 0.5 --n 3
    .venv/bin/python benchmarks/bench_resample.py --model models/demo --out resample.tsv
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from neonb.data import read_manifest
from neonb.export import export_run, load_exported_model
from neonb.metrics import dice_per_class
from neonb.phantom import write_cohort
from neonb.segmentation import (
    _predict,
    from_model_grid,
    from_model_grid_probabilities,
    load_inputs,
    plan_grid,
    prepare_image,
)


def compare_session(model, row, device: str = "cpu") -> dict[str, float]:
    """Dice of both ways of mapping back, and their seconds, for one session."""
    images, reference = load_inputs(
        {"t2w": row.t2w, "t1w": row.t1w}, model.channels, reference=row.dseg, labels=model.labels
    )
    anchor = images["t2w"]
    mapping = plan_grid(anchor, model.orientation, model.voxel_size_mm)
    volumes = [np.asanyarray(images[key].dataobj) for key in model.channels]
    image = prepare_image(volumes, mapping, model.channels)
    prediction, _ = _predict(model, image.as_tensor(), device, False, keep_probs=True)
    truth = np.asanyarray(reference.dataobj).astype(np.int64)
    n = len(model.labels)
    result = {"voxel_size_mm": float(nib.affines.voxel_sizes(anchor.affine)[0])}
    start = time.perf_counter()
    old = from_model_grid(prediction.labels, image.affine, mapping)
    result["old_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    new = from_model_grid_probabilities(
        prediction.probs, image.affine, mapping,
        box=prediction.box, model_shape=prediction.labels.shape,
    )  # fmt: skip
    result["new_seconds"] = time.perf_counter() - start
    result["old_dice"] = float(np.nanmean(dice_per_class(old, truth, num_classes=n)[1:]))
    result["new_dice"] = float(np.nanmean(dice_per_class(new, truth, num_classes=n)[1:]))
    result["voxels_differ"] = float((old != new).mean())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a model folder (neonb export)")
    source.add_argument("--run", type=Path, help="a training run folder, exported here")
    parser.add_argument("--data-root", type=Path, help="with --run: its training data")
    parser.add_argument("--voxel-sizes", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--n", type=int, default=3, help="subjects per voxel size")
    parser.add_argument("--seed", type=int, default=7, help="phantom seed (not the training's)")
    parser.add_argument("--out", type=Path, help="write the table as TSV")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="bench-resample-") as tmp:
        tmp = Path(tmp)
        model_dir = args.model or export_run(args.run, tmp / "model", data_root=args.data_root)
        model = load_exported_model(model_dir)
        rows = []
        for size in args.voxel_sizes:
            cohort = write_cohort(
                tmp / f"cohort-{size:g}mm", n=args.n, seed=args.seed, voxel_size=size,
                progress=False,
            )  # fmt: skip
            for row in read_manifest(cohort, progress=False).itertuples(index=False):
                name = f"sub-{row.participant_id}_ses-{row.session_id}"
                rows.append({"session": name} | compare_session(model, row))
                print(rows[-1], file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby("voxel_size_mm")[
        ["old_dice", "new_dice", "voxels_differ", "old_seconds", "new_seconds"]
    ].mean()
    summary["gain"] = summary["new_dice"] - summary["old_dice"]
    cpu = platform.processor() or platform.machine()
    print(f"model grid {model.voxel_size_mm} mm; {cpu}, {torch.get_num_threads()} threads")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    if args.out:
        table.to_csv(args.out, sep="\t", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
