"""Benchmark ``neonb segment``: seconds per volume, end to end and for the network alone.

Times :func:`neonb.segmentation.segment_scan` (what ``neonb segment --t2 ... --t1 ...`` runs
after loading the model) on synthetic subjects written with
:func:`neonb.phantom.write_cohort`:

* ``native``: a subject on the model's own grid (the demo model: 1.5 mm, RAS);
* ``reoriented``: the same subject stored in LPS order (reoriented for the model and back);
* ``dHCP grid``: a 0.5 mm subject, 217 x 290 x 290 voxels, the dHCP release's grid
  (resampled to the model's voxel size and the labels back).

Each row gives the best (shortest) of ``--repeats`` runs of the whole call (reading and checking
the inputs, reorientation, resampling, normalisation, sliding-window inference, mapping
back, writing the segmentation, tables and QC image) and of the network inference alone:
the best of a few runs is the least disturbed by other processes sharing the machine (the
header prints the load average, which should be near 0). It runs on the CPU, and on the
GPU as well when CUDA is available.

Usage:
    .venv/bin/python benchmarks/bench_segment.py                 # exports the demo run
    .venv/bin/python benchmarks/bench_segment.py --model models/demo --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import torch
from nibabel import orientations

from neonb.data import read_manifest
from neonb.export import export_run, load_exported_model
from neonb.inference import describe_hardware
from neonb.phantom import write_cohort
from neonb.segmentation import segment_scan

ROOT = Path(__file__).resolve().parents[1]
DEMO_RUN = ROOT / "results" / "demo" / "01_pipeline" / "run-0"
DEMO_DATA = ROOT / "data" / "synthetic-n60-1.5mm-seed0"


def _subject(folder: Path, voxel_size: float, seed: int) -> dict[str, Path]:
    root = write_cohort(folder, n=1, seed=seed, voxel_size=voxel_size, progress=False)
    row = read_manifest(root, progress=False).iloc[0]
    return {"t2w": Path(row["t2w"]), "t1w": Path(row["t1w"])}


def _reoriented(paths: dict[str, Path], codes: str, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, path in paths.items():
        image = nib.load(path)
        transform = orientations.ornt_transform(
            orientations.io_orientation(image.affine), orientations.axcodes2ornt(tuple(codes))
        )
        out[key] = folder / f"sub-bench_ses-1_{key}.nii.gz"
        nib.save(image.as_reoriented(transform), out[key])
    return out


def _time(model, paths, out_dir: Path, device: str, repeats: int) -> tuple[float, float]:
    totals, inference = [], []
    for _ in range(repeats):
        result = segment_scan(model, paths["t2w"], out_dir, t1w=paths["t1w"], device=device)
        totals.append(result.seconds)
        inference.append(result.inference_s)
    return min(totals), min(inference)


def _model_dir(args: argparse.Namespace, work: Path) -> Path:
    if args.model is not None:
        return args.model
    if not (DEMO_RUN / "model_best.pt").is_file():
        sys.exit(f"no --model given and no demo run at {DEMO_RUN}: run `make study` first")
    return export_run(DEMO_RUN, work / "model", data_root=DEMO_DATA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: export the demo run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto (CPU, plus GPU if any), cpu, cuda")
    args = parser.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "auto":
        devices = [args.device]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = load_exported_model(_model_dir(args, work))
        native = _subject(work / "native", model.voxel_size_mm[0], args.seed)
        cases = {
            "native": native,
            "reoriented (LPS)": _reoriented(native, "LPS", work / "lps"),
            "dHCP grid (0.5 mm)": _subject(work / "dhcp", 0.5, args.seed),
        }
        print(f"model: {model.model_dir} ({model.metadata['architecture']}, "
              f"{'x'.join(map(str, model.patch_size))} windows, overlap {model.overlap:g}, "
              f"trained at {model.voxel_size_mm[0]:g} mm {model.orientation})")  # fmt: skip
        print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, load average "
              f"{os.getloadavg()[0]:.2f}; best of {args.repeats} runs")  # fmt: skip
        header = f"{'input':<20} {'grid':<16} {'device':<34} {'total_s':>8} {'network_s':>10}"
        print(header)
        print("-" * len(header))
        for device in devices:
            hardware = describe_hardware(device)
            for name, paths in cases.items():
                image = nib.load(paths["t2w"])
                grid = "x".join(str(n) for n in image.shape)
                total, network = _time(model, paths, work / "out", device, args.repeats)
                print(f"{name:<20} {grid:<16} {hardware:<34} {total:>8.2f} {network:>10.2f}")


if __name__ == "__main__":
    main()
