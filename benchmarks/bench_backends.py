"""Benchmark the inference backends on a trained network: same labels, and how much faster.

Each test volume of a trained run is segmented by :func:`neonb.inference.segment` (the
study's and ``neonb segment``'s path: windows over the head's box, the run's window size and
overlap) with PyTorch in fp32 (the reference: the path before OpenVINO) and with every other
variant: PyTorch fp32 with the network channels-last (as :func:`neonb.engine.fit` leaves it
on the CPU, with layout-keeping instance norms: ``neonb.models.channels_last``), OpenVINO
fp32 and, where the CPU computes bf16 natively, OpenVINO bf16 and PyTorch bf16 autocast. For
each variant the table gives the Dice of every class between its labels and the reference's
(mean over classes and volumes, the worst volume, the worst class of any volume), the
fraction of voxels with the same label, and the seconds per volume (variants take turns
volume by volume, so load on the machine slows them alike; converting to OpenVINO is timed
apart). A last line times the label map of the first volume's probabilities: ``argmax`` over
the classes against :func:`neonb.inference.class_indices`.

Usage:
    .venv/bin/python benchmarks/bench_backends.py --run results/demo/01_pipeline/run-0 \\
        --data-root data/synthetic-n60-1.5mm-seed0 --splits results/demo/splits_pipeline.tsv
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from neonb import data, models
from neonb.experiment import load_trained_run, prepare_volumes
from neonb.inference import (
    OpenVINONetwork,
    class_indices,
    cpu_has_native_bf16,
    predict_foreground,
    segment,
)
from neonb.metrics import dice_per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run folder")
    parser.add_argument("--data-root", type=Path, required=True, help="its cohort folder")
    parser.add_argument(
        "--splits",
        type=Path,
        required=True,
        help="the study's splits TSV (participant_id, session_id, split)",
    )
    parser.add_argument("--split", default="test", help="which split to take (test)")
    parser.add_argument("--n", type=int, default=10, help="volumes (default 10)")
    parser.add_argument("--out", type=Path, help="also write the table as TSV")
    args = parser.parse_args()

    trained, config = load_trained_run(args.run)
    model = trained.model.eval()
    manifest = data.read_manifest(args.data_root, progress=False)
    splits = data.read_tsv(args.splits)
    wanted = {
        (str(row.participant_id), str(row.session_id))
        for row in splits.itertuples()
        if row.split == args.split
    }
    records = [
        r
        for r in data.to_data_dicts(manifest)
        if (str(r["participant_id"]), str(r["session_id"])) in wanted
    ]
    volumes = prepare_volumes(records[: args.n], channels=config.channels)
    window = "x".join(map(str, config.patch_size))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {len(volumes)} volumes of {args.run}, "
          f"{window} windows, overlap {config.overlap:g}")  # fmt: skip

    variants = {"torch fp32": (model, False)}
    variants["torch fp32 channels-last"] = (models.channels_last(copy.deepcopy(model)), False)
    started = time.perf_counter()
    variants["openvino fp32"] = (OpenVINONetwork(model, patch_size=config.patch_size), False)
    print(f"converting and compiling for OpenVINO fp32: {time.perf_counter() - started:.1f} s")
    if cpu_has_native_bf16():
        network = OpenVINONetwork(model, patch_size=config.patch_size, precision="bf16")
        variants["openvino bf16"] = (network, False)
        variants["torch bf16"] = (model, True)

    labels: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for volume in volumes:
        for name, (network, amp) in variants.items():
            began = time.perf_counter()
            labels[name].append(
                segment(
                    network,
                    volume["image"],
                    patch_size=config.patch_size,
                    overlap=config.overlap,
                    sw_batch_size=8,
                    device="cpu",
                    amp=amp,
                )  # fmt: skip
            )
            seconds[name].append(time.perf_counter() - began)

    rows = []
    for name in variants:
        dice = np.array(
            [
                dice_per_class(ours, ref, num_classes=10)
                for ours, ref in zip(labels[name], labels["torch fp32"], strict=True)
            ]
        )
        pairs = zip(labels[name], labels["torch fp32"], strict=True)
        same = np.mean([(ours == ref).mean() for ours, ref in pairs])
        rows.append(
            {
                "variant": name,
                "mean_dice": np.nanmean(dice),
                "worst_volume": np.nanmin(np.nanmean(dice, axis=1)),
                "worst_class": np.nanmin(dice),
                "voxels_same": same,
                "s_per_volume": np.median(seconds[name]),
                "speedup": np.median(seconds["torch fp32"]) / np.median(seconds[name]),
            }
        )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    _time_label_map(model, volumes[0]["image"], config)
    if args.out:
        table.to_csv(args.out, sep="\t", index=False, float_format="%.6g")


def _time_label_map(model: torch.nn.Module, image: torch.Tensor, config) -> None:
    """Print the median time of argmax and of class_indices over one volume's probabilities."""
    probs, _ = predict_foreground(
        model, image, patch_size=config.patch_size, overlap=config.overlap, device="cpu"
    )
    times = {}
    label_maps = {"argmax": lambda p: p.argmax(dim=0), "class_indices": class_indices}
    for name, label_map in label_maps.items():
        runs = []
        for _ in range(7):
            began = time.perf_counter()
            label_map(probs)
            runs.append(time.perf_counter() - began)
        times[name] = float(np.median(runs))
    assert torch.equal(probs.argmax(dim=0), class_indices(probs))
    print(
        f"label map of {tuple(probs.shape)} probabilities: argmax {times['argmax'] * 1e3:.1f} ms, "
        f"class_indices {times['class_indices'] * 1e3:.1f} ms "
        f"({times['argmax'] / times['class_indices']:.1f}x), the same labels"
    )


if __name__ == "__main__":
    main()
